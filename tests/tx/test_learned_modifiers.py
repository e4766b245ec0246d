"""Learned score modifiers: declared by the modifier, owned by the attention layer, bound at
call time, served by the ``xla`` reference and the Pallas kernels (interpret mode on CPU),
which return the gradients of the layer's parameters.

KERPLE (``examples/extending/kerple_positions.py``, a positions' modifier) and sinks
(``AttentionConfig(sinks=True)``: ``sink_n``), alone and chained, on a shape that is not a
block multiple with GQA (N=4, K=2)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx.kernels import masks as M
from tx.kernels import reference
from tx.kernels import score_mods as sm
from tx.kernels.flash_attention import flash_attention
from tx.kernels.paged_attention import paged_attention
from tests.kernels.test_flash_attention import SMALL, TOL, _assert_close
from tests.kernels.test_score_mods import _pool
from tx import flags as tx_flags
from tx import models
from tx.attention import Attention

ROOT = pathlib.Path(__file__).resolve().parents[2]
B, T, D, N, K, H = 2, 37, 32, 4, 2, 16


@pytest.fixture(scope="module")
def kerple():
    """The example file as a module; its ``kerple`` flag name is withdrawn afterwards."""
    before = dict(tx_flags.POSITIONS._entries)
    spec = importlib.util.spec_from_file_location(
        "_kerple_example", ROOT / "examples" / "extending" / "kerple_positions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    tx_flags.POSITIONS._entries = before


@pytest.fixture(autouse=True)
def _release_compiled():
    yield
    jax.clear_caches()


def _layer(kerple, which, implementation, seed=0):
    positions = kerple.KerplePositions() if "kerple" in which else None
    layer = Attention(D, N, K, H, mask=M.Causal(), positions=positions,
                      sinks="sinks" in which, implementation=implementation,
                      score_mod=sm.SoftCap(4.0) if "softcap" in which else None,
                      rngs=nnx.Rngs(seed))
    for i, name in enumerate(layer.learned_names):  # away from the initial values
        p = getattr(layer, name)
        p[...] = p[...] + jax.random.normal(jax.random.key(10 + i), p[...].shape)
    return layer


def _value_and_grads(layer, x, dy):
    graph, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def run(params, x):
        def f(params, x):
            return nnx.merge(graph, params, rest)(x)
        out, pull = jax.vjp(f, params, x)
        return out, pull(dy)
    return run(params, x)


WHICH = [("kerple",), ("sinks",), ("kerple", "softcap", "sinks")]


@pytest.mark.parametrize("which", WHICH, ids=["+".join(w) for w in WHICH])
def test_the_layer_owns_the_declared_parameters(kerple, which):
    layer = _layer(kerple, which, ("xla",))
    want = {"kerple": ("r1_raw", "r2_raw"), "sinks": ("sink_n",)}
    names = tuple(n for w in which for n in want.get(w, ()))
    assert layer.learned_names == names
    state = nnx.state(layer, nnx.Param)
    for name in names:
        param = getattr(layer, name)
        assert isinstance(param, nnx.Param) and param[...].shape == (N,)
        assert param.get_metadata()["out_sharding"] == ("heads",)
        assert name in state  # a path of its own on the layer (checkpoints, HF's sinks)
    mod = layer.logits_mod()  # bound: the kernels' leaves are the layer's arrays
    assert not mod.learned(N)
    leaves = jax.tree.leaves(mod)
    for name in names:
        assert any(leaf is getattr(layer, name)[...] for leaf in leaves)
    assert kerple.KerplePositions().score_mod().learned(N)  # unbound in the positions
    with pytest.raises(ValueError, match="unbound"):
        flash_attention(*(jnp.zeros((1, 8, N, H)),) * 3, score_mod=sm.Sinks(), interpret=True)


@pytest.mark.parametrize("which", WHICH, ids=["+".join(w) for w in WHICH])
def test_pallas_layer_matches_xla_in_outputs_and_parameter_gradients(kerple, which):
    """The whole layer on each implementation: outputs and every parameter's gradient,
    the learned modifier's included (the flash kernel's backward returns them)."""
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    dy = jax.random.normal(jax.random.key(2), (B, T, D))
    got = _value_and_grads(_layer(kerple, which, ("pallas",)), x, dy)
    want = _value_and_grads(_layer(kerple, which, ("xla",)), x, dy)
    _assert_close("out", got[0], want[0], TOL["float32"]["fwd"])
    got_grads, want_grads = got[1][0], want[1][0]
    for name in _layer(kerple, which, ("xla",)).learned_names:
        assert np.abs(np.asarray(want_grads[name][...])).max() > 1e-4, name  # in the loss
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                                 jax.tree_util.tree_leaves_with_path(want_grads)):
        _assert_close(jax.tree_util.keystr(path), g, w, TOL["float32"]["grad"])


@pytest.mark.parametrize("which", WHICH, ids=["+".join(w) for w in WHICH])
def test_flash_kernel_matches_reference_on_small_tiles(kerple, which):
    """The kernel itself on tiles smaller than the sequence (ragged last tile, GQA folds):
    outputs and the gradients of the parameters the modifier was bound to."""
    layer = _layer(kerple, which, ("xla",))
    params = {n: getattr(layer, n)[...] for n in layer.learned_names}
    rng = np.random.default_rng(0)
    q, do = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    unbound = layer.score_mod if "kerple" not in which else \
        sm.chain(layer.positions.score_mod(), layer.score_mod)

    def run(attend):
        def f(params, q, k, v):
            return attend(q, k, v, mask=M.Causal(), score_mod=unbound.bind(params, N))
        out, pull = jax.vjp(f, params, q, k, v)
        return out, pull(do)

    got = run(lambda *a, **kw: flash_attention(*a, **kw, block_sizes=SMALL, interpret=True))
    want = run(reference.attention)
    _assert_close("out", got[0], want[0], TOL["float32"]["fwd"])
    for name in params:
        assert np.abs(np.asarray(want[1][0][name])).max() > 1e-4
        _assert_close(f"d{name}", got[1][0][name], want[1][0][name], TOL["float32"]["grad"])
    for name, g, w in zip(("dq", "dk", "dv"), got[1][1:], want[1][1:]):
        _assert_close(name, g, w, TOL["float32"]["grad"])


@pytest.mark.parametrize("which", WHICH, ids=["+".join(w) for w in WHICH])
def test_paged_kernel_serves_the_bound_modifier(kerple, which):
    layer = _layer(kerple, which, ("xla",))
    mod = layer.logits_mod()
    q, k, v, table, lengths = _pool([5, 33, 40], N, K, H, 8, 2, "float32")
    for split_k in (1, 3):
        got = paged_attention(q, k, v, table, lengths, mask=M.Causal(), score_mod=mod,
                              split_k=split_k, interpret=True)
        want = reference.paged_attention(q, k, v, table, lengths, mask=M.Causal(),
                                         score_mod=mod)
        _assert_close("paged", got, want, TOL["float32"]["fwd"])
    plain = reference.paged_attention(q, k, v, table, lengths, mask=M.Causal())
    assert np.abs(np.asarray(want - plain)).max() > 1e-3  # the modifier is not vacuous


def test_kerple_is_its_closed_form(kerple):
    """``-r1 * log(1 + r2 |i - j|)`` per head, r = softplus(raw), in the reference."""
    layer = _layer(kerple, ("kerple",), ("xla",))
    mod = layer.logits_mod()
    pos = jnp.arange(6, dtype=jnp.int32)
    head = jnp.arange(N, dtype=jnp.int32)[:, None, None]
    got = sm.reference_logits(mod, jnp.zeros((N, 6, 6)), head=head, batch=0,
                              q_pos=pos[None, :, None], kv_pos=pos[None, None, :],
                              num_heads=N)
    r1, r2 = (jax.nn.softplus(getattr(layer, n)[...])[:, None, None]
              for n in ("r1_raw", "r2_raw"))
    want = -r1 * jnp.log1p(r2 * jnp.abs(pos[:, None] - pos[None, :]).astype(jnp.float32)[None])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sinks_config_builds_sink_n():
    """``AttentionConfig(sinks=True)`` keeps building one ``sink_n`` per layer, zeros."""
    model_cfg = tx_flags.model_config(task="lm", vocab_size=16, d_model=16, num_layers=2,
                                      num_heads=4, d_ff=32, attention_sinks=True)
    model = models.build(model_cfg)
    layers = model.tower.self_attentions()
    assert len(layers) == 2
    for layer in layers:
        assert layer.learned_names == ("sink_n",)
        assert not np.asarray(layer.sink_n[...]).any()
        assert isinstance(layer.logits_mod(), sm.Sinks)


def test_layer_bound_modifiers_lower_for_cuda(kerple):
    """The bound chain (KERPLE's log1p, sinks) through Pallas' Triton lowering: flash
    forward, dq, dk/dv and the paged kernel (``jax.export`` for CUDA on this host)."""
    from tests.kernels.test_score_mods import _export_cuda  # noqa: PLC0415
    layer = _layer(kerple, ("kerple", "sinks"), ("xla",))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, T, K, 64)), jnp.bfloat16)
    pool = _pool([5, 40], N, K, 64, 16, 1, "bfloat16")

    def step(q, k, mod, pool):
        def loss(q, k, mod):
            out = flash_attention(q, k, k, mask=M.Causal(), score_mod=mod, interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, mod), paged_attention(
            *pool, mask=M.Causal(), score_mod=mod, interpret=False)

    exported = _export_cuda(step, q, k, layer.logits_mod(), pool)
    assert exported.mlir_module().count("xla.gpu.triton") >= 4
