"""Score modifiers (``kernels.score_mods``) in the kernels against the reference.

The conformance matrix: every modifier x {causal, local, local|global, segments, kv_lengths}
x {MHA, GQA 4:1, MQA} x {fp32, bf16}, forward and every gradient (q, k, v and the modifier's
own parameters), flash kernel (interpret mode on CPU) against ``kernels.reference.attention``
on the same rounded inputs in fp32. The paged decode kernel against
``kernels.reference.paged_attention``. Sinks against their closed form. Every kernel
configuration exported for CUDA (``jax.export``, lowered through Pallas' Triton backend).
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference
from tx.kernels import score_mods as sm
from tx.kernels.flash_attention import flash_attention
from tx.kernels.paged_attention import paged_attention
# The flash tests' tiles and per-dtype (atol, rtol); _assert_close returns the max error.
from tests.kernels.test_flash_attention import SMALL, TOL, _assert_close

B, T = 2, 37  # not a multiple of any block


@pytest.fixture(autouse=True)
def _release_compiled():
    """Each cell compiles its own kernels, a few hundred memory maps of executables: let them
    go after the test, or the matrix alone would exhaust a worker's maps (tests/conftest.py)."""
    yield
    jax.clear_caches()
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (4, 1)}


def _distance_penalty(s, batch, head, q_pos, kv_pos):
    """A user function: a per-head scaled logit, a distance penalty and a per-row offset."""
    gain = 1.0 + 0.1 * head.astype(jnp.float32)
    distance = jnp.abs(q_pos - kv_pos).astype(jnp.float32)
    return s * gain - 0.05 * distance + 0.1 * batch.astype(jnp.float32)


def make_mod(name: str, n: int, seed: int = 0) -> sm.ScoreMod:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    if name == "alibi":
        return sm.ALiBi(jnp.asarray(sm.alibi_slopes(n), jnp.float32))
    if name == "t5":
        return sm.T5Bias(normal(8, n), num_buckets=8, max_distance=20, bidirectional=True)
    if name == "softcap":
        return sm.SoftCap(2.0)  # small enough to bend logits of unit-normal q . k
    if name == "sinks":
        return sm.Sinks(normal(n))
    if name == "fn":
        return sm.ScoreFn(_distance_penalty)
    if name == "chain":
        return sm.chain(make_mod("t5", n, seed), sm.SoftCap(3.0), make_mod("sinks", n, seed))
    raise KeyError(name)


MODS = ("alibi", "t5", "softcap", "sinks", "fn", "chain")


def _pattern(name: str):
    """``(mask, data)`` of a pattern column."""
    if name == "causal":
        return M.Causal(), {}
    if name == "local":
        return M.Local(9), {}
    if name == "local_or_global":
        return M.Local(4, 4) | M.GlobalTokens((0, 20)), {}
    if name == "segments":
        ids = np.cumsum(np.random.default_rng(1).random((B, T)) < 0.1, axis=1).astype(np.int32)
        return M.Causal(), {"segment_ids": (jnp.asarray(ids), jnp.asarray(ids))}
    if name == "kv_lengths":  # row 1 sees no key at all: zeros, not NaN
        return M.Full(), {"kv_lengths": jnp.asarray([23, 0], jnp.int32)}
    raise KeyError(name)


PATTERNS = ("causal", "local", "local_or_global", "segments", "kv_lengths")


def _inputs(n, kh, h, dtype, s=T, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, n, h), (B, s, kh, h), (B, s, kh, h), (B, T, n, h))
    return tuple(jnp.asarray(rng.standard_normal(x), dtype) for x in shapes)


@functools.partial(jax.jit, static_argnums=(0,))
def _kernel_value_and_grads(mask, q, k, v, do, mod, data):
    def fn(q, k, v, mod):
        return flash_attention(q, k, v, mask=mask, score_mod=mod, block_sizes=SMALL,
                               interpret=True, **data)
    out, pull = jax.vjp(fn, q, k, v, mod)
    return out, pull(do)


@functools.partial(jax.jit, static_argnums=(0,))
def _reference_value_and_grads(mask, q, k, v, do, mod, data):
    def fn(q, k, v, mod):
        return reference.attention(q, k, v, mask=mask, score_mod=mod, **data)
    out, pull = jax.vjp(fn, q, k, v, mod)
    return out, pull(do)


def _check_case(mod_name, pattern, heads, dtype):
    """Asserts one cell of the matrix; returns its worst error per quantity."""
    n, kh = HEADS[heads]
    mask, data = _pattern(pattern)
    q, k, v, do = _inputs(n, kh, 16, dtype)
    mod = make_mod(mod_name, n)
    out, grads = _kernel_value_and_grads(mask, q, k, v, do, mod, data)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want_out, want_grads = _reference_value_and_grads(mask, *f32, mod, data)
    errors = {"out": _assert_close("out", out, want_out, TOL[dtype]["fwd"])}
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], want_grads[:3]):
        errors[name] = _assert_close(name, got, want, TOL[dtype]["grad"])
    got_mod, want_mod = jax.tree.leaves(grads[3]), jax.tree.leaves(want_grads[3])
    assert len(got_mod) == len(want_mod) == len(jax.tree.leaves(mod))
    for got, want in zip(got_mod, want_mod):
        assert np.abs(np.asarray(want)).max() > 0  # the parameters are in the loss
        errors["dparams"] = max(errors.get("dparams", 0.0), _assert_close(
            f"d {mod_name} params", got, want, TOL[dtype]["grad"]))
    if "kv_lengths" in data:  # the row that sees nothing: zeros and zero gradients
        assert not np.asarray(out[1], np.float32).any()
        assert not np.asarray(grads[0][1], np.float32).any()
    return errors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mod_name", MODS)
def test_flash_matches_reference(mod_name, pattern, heads, dtype):
    _check_case(mod_name, pattern, heads, dtype)


def test_modifiers_change_the_output():
    """The matrix is not vacuous: each modifier moves the output of the plain kernel."""
    n, kh = HEADS["gqa4"]
    q, k, v, _ = _inputs(n, kh, 16, "float32")
    plain = flash_attention(q, k, v, mask=M.Causal(), block_sizes=SMALL, interpret=True)
    for name in MODS:
        out = reference.attention(q, k, v, mask=M.Causal(), score_mod=make_mod(name, n))
        assert np.abs(np.asarray(out - plain)).max() > 1e-2, name


def test_calls_with_and_without_a_modifier_share_a_process():
    """Kernel configs with and without a parameterless modifier meet in jit's cache."""
    q, k, v, _ = _inputs(4, 2, 16, "float32")
    pq, pk, pv, table, lengths = _pool([5, 9], 4, 2, 16, 8, 1, "float32")
    for mod in (None, sm.SoftCap(2.0), sm.ScoreFn(_distance_penalty)):
        out = jax.jit(lambda q: flash_attention(q, k, v, mask=M.Causal(), score_mod=mod,
                                                block_sizes=SMALL, interpret=True))(q)
        want = reference.attention(q, k, v, mask=M.Causal(), score_mod=mod)
        _assert_close("flash", out, want, TOL["float32"]["fwd"])
        out = jax.jit(lambda q: paged_attention(q, pk, pv, table, lengths, score_mod=mod,
                                                interpret=True))(pq)
        want = reference.paged_attention(pq, pk, pv, table, lengths, score_mod=mod)
        _assert_close("paged", out, want, TOL["float32"]["fwd"])


# --- sinks: the closed form ---------------------------------------------------------------------

def test_sinks_closed_form():
    """softmax over [logits, sink] with the sink's column dropped, for the kernel and the
    reference, including the gradient of the sink logits (by autodiff of the closed form)."""
    n, kh, h = 8, 2, 16
    q, k, v, do = _inputs(n, kh, h, "float32")
    sinks = make_mod("sinks", n)
    g = n // kh

    def closed(q, k, v, sink):
        kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, kr) * h ** -0.5
        logits = jnp.where(M.Causal().dense(T, T), logits, -jnp.inf)
        col = jnp.broadcast_to(sink[None, :, None, None], (B, n, T, 1))
        p = jax.nn.softmax(jnp.concatenate([logits, col], axis=-1), axis=-1)[..., :-1]
        return jnp.einsum("BNTS,BSNH->BTNH", p, vr)

    want, pull = jax.vjp(closed, q, k, v, sinks.logits)
    want_grads = pull(do)
    for got, grads in (_kernel_value_and_grads(M.Causal(), q, k, v, do, sinks, {}),
                       _reference_value_and_grads(M.Causal(), q, k, v, do, sinks, {})):
        _assert_close("out", got, want, TOL["float32"]["fwd"])
        for name, a, b in zip(("dq", "dk", "dv", "dsink"), grads[:3] + (grads[3].logits,),
                              want_grads):
            _assert_close(name, a, b, TOL["float32"]["grad"])


def test_sink_takes_mass_and_empty_rows_stay_zero():
    n, kh = 4, 4
    q, k, v, _ = _inputs(n, kh, 16, "float32")
    huge = sm.Sinks(jnp.full((n,), 30.0, jnp.float32))  # the sink takes (almost) all mass
    out = flash_attention(q, k, v, mask=M.Causal(), score_mod=huge, block_sizes=SMALL,
                          interpret=True, kv_lengths=jnp.asarray([T, 0], jnp.int32))
    assert np.abs(np.asarray(out)).max() < 1e-9


# --- T5 buckets and ALiBi equal their dense biases ---------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_equals_dense_bias(bidirectional):
    n = 4
    table = jnp.asarray(np.random.default_rng(3).standard_normal((32, n)), jnp.float32)
    mod = sm.T5Bias(table, num_buckets=32, max_distance=128, bidirectional=bidirectional)
    pos = np.arange(T)
    bucket = sm.t5_bucket(jnp.asarray(pos[None, :] - pos[:, None]), num_buckets=32,
                          max_distance=128, bidirectional=bidirectional)
    bias = jnp.transpose(table[bucket], (2, 0, 1))[None]                   # [1, N, T, S]
    q, k, v, _ = _inputs(n, 2, 16, "float32")
    mask = M.Full() if bidirectional else M.Causal()
    want = reference.attention(q, k, v, mask=mask, bias=bias)
    got = flash_attention(q, k, v, mask=mask, score_mod=mod, block_sizes=SMALL, interpret=True)
    _assert_close("t5", got, want, TOL["float32"]["fwd"])


# --- the paged decode kernel --------------------------------------------------------------------

def _pool(lengths, n, kh, h, page, t, dtype, seed=0):
    rng = np.random.default_rng(seed)
    max_pages = -(-max(lengths) // page)
    p = len(lengths) * max_pages + 3
    q = jnp.asarray(rng.standard_normal((len(lengths), t, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((kh, p, page, h)), dtype)
    v = jnp.asarray(rng.standard_normal((kh, p, page, h)), dtype)
    table = jnp.asarray(rng.permutation(p)[:len(lengths) * max_pages].reshape(
        len(lengths), max_pages), jnp.int32)
    return q, k, v, table, jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("heads, split_k", [("mha", 1), ("gqa4", 3), ("mqa", 3)])
@pytest.mark.parametrize("mask", [M.Causal(), M.Local(6)], ids=["causal", "local"])
@pytest.mark.parametrize("mod_name", MODS)
def test_paged_matches_reference(mod_name, mask, heads, split_k):
    """Every modifier with each head layout; split-K (a sink joins one split only) and a
    single program both."""
    n, kh = HEADS[heads]
    q, k, v, table, lengths = _pool([5, 33, 40], n, kh, 16, 8, 2, "float32")
    mod = make_mod(mod_name, n)
    got = paged_attention(q, k, v, table, lengths, mask=mask, score_mod=mod, split_k=split_k,
                          interpret=True)
    want = reference.paged_attention(q, k, v, table, lengths, mask=mask, score_mod=mod)
    _assert_close("paged", got, want, TOL["float32"]["fwd"])


def test_paged_bf16_and_int8_pages_with_modifier():
    n, kh = HEADS["gqa4"]
    q, k, v, table, lengths = _pool([9, 30], n, kh, 16, 8, 1, "bfloat16")
    mod = make_mod("chain", n)
    got = paged_attention(q, k, v, table, lengths, mask=M.Causal(), score_mod=mod,
                          interpret=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = reference.paged_attention(*f32, table, lengths, mask=M.Causal(), score_mod=mod)
    _assert_close("paged bf16", got, want, TOL["bfloat16"]["fwd"])
    codes = lambda x: jnp.round(x * 20).astype(jnp.int8)  # noqa: E731
    scales = jnp.full(k.shape[:3], 0.05, jnp.float32)
    got = paged_attention(f32[0], codes(f32[1]), codes(f32[2]), table, lengths,
                          mask=M.Causal(), score_mod=mod, k_scales=scales, v_scales=scales,
                          interpret=True)
    want = reference.paged_attention(f32[0], codes(f32[1]), codes(f32[2]), table, lengths,
                                     mask=M.Causal(), score_mod=mod, k_scales=scales,
                                     v_scales=scales)
    _assert_close("paged int8", got, want, TOL["float32"]["fwd"])


# --- CUDA lowering of every kernel configuration ------------------------------------------------

def _export_cuda(fn, *args):
    """``jax.export`` for CUDA on this (GPU-less) host: the Pallas kernels lower through the
    Triton backend; only the check that refuses to serialise Triton custom calls is off."""
    from jax import export
    check = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[check])(*args)


@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("mod_name", MODS)
def test_every_configuration_exports_for_cuda(mod_name, dtype, h):
    """Forward, dq and dk/dv (through the value and gradients) and the paged kernel with the
    modifier, for this head dim and dtype, lower for an NVIDIA target."""
    n, kh = HEADS["gqa4"]
    q, k, v, do = _inputs(n, kh, h, dtype, s=40)
    mod = make_mod(mod_name, n)
    pq, pk, pv, table, lengths = _pool([5, 40], n, kh, h, 16, 1, dtype)

    def step(q, k, v, do, mod, pq, pk, pv, table, lengths):
        def loss(q, k, v, mod):
            out = flash_attention(q, k, v, mask=M.Local(8) | M.GlobalTokens((0,)),
                                  score_mod=mod, interpret=False)
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, mod)
        decoded = paged_attention(pq, pk, pv, table, lengths, mask=M.Causal(), score_mod=mod,
                                  split_k=2, interpret=False)
        return grads, decoded

    exported = _export_cuda(step, q, k, v, do, mod, pq, pk, pv, table, lengths)
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    # flash forward, dq, dk/dv and the paged kernel
    assert text.count("xla.gpu.triton") >= 4


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_and_head_layout_exports_for_cuda(pattern, heads):
    """The matrix's other axes (masks, segment ids, key lengths, GQA folds) with every
    modifier at once, forward and backward."""
    n, kh = HEADS[heads]
    mask, data = _pattern(pattern)
    q, k, v, do = _inputs(n, kh, 64, "bfloat16")
    mod = sm.chain(make_mod("t5", n), make_mod("alibi", n), sm.SoftCap(3.0),
                   sm.ScoreFn(_distance_penalty), make_mod("sinks", n))

    def step(q, k, v, do, mod, data):
        def loss(q, k, v, mod):
            out = flash_attention(q, k, v, mask=mask, score_mod=mod, interpret=False, **data)
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, mod)

    exported = _export_cuda(step, q, k, v, do, mod, data)
    assert exported.mlir_module().count("xla.gpu.triton") >= 3


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mod, match", [
    (lambda: sm.T5Bias(jnp.zeros((8, 3)), num_buckets=8), r"T5Bias.table.shape=\(8, 3\)"),
    (lambda: sm.T5Bias(jnp.zeros((16, 4)), num_buckets=8), r"T5Bias.table.shape=\(16, 4\)"),
    (lambda: sm.T5Bias(jnp.zeros((6, 4)), num_buckets=6), "T5Bias.num_buckets=6"),
    (lambda: sm.Sinks(jnp.zeros((3,))), r"Sinks.logits.shape=\(3,\)"),
    (lambda: sm.ALiBi(jnp.zeros((2,))), r"ALiBi.slopes.shape=\(2,\)"),
    (lambda: "softcap", "score_mod='softcap'"),
])
def test_bad_modifier_is_a_value_error_before_tracing(mod, match, monkeypatch):
    traced = []
    monkeypatch.setattr(sys.modules["tx.kernels.flash_attention"], "_flash_jit",
                        lambda *a: traced.append(a))
    q, k, v, _ = _inputs(4, 2, 16, "float32")
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, score_mod=mod(), interpret=True)
    with pytest.raises(ValueError, match=match):
        reference.attention(q, k, v, score_mod=mod())
    pq, pk, pv, table, lengths = _pool([5, 9], 4, 2, 16, 8, 1, "float32")
    with pytest.raises(ValueError, match=match):
        paged_attention(pq, pk, pv, table, lengths, score_mod=mod(), interpret=True)
    assert not traced


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), "50"])
def test_bad_cap(cap):
    with pytest.raises(ValueError, match="SoftCap.cap="):
        sm.SoftCap(cap)


@pytest.mark.parametrize("fn, what", [
    (lambda s, b, h, qp, kp: s.sum(axis=-1, keepdims=True), "shape"),
    (lambda s, b, h, qp, kp: s.astype(jnp.bfloat16), "bfloat16"),
])
def test_score_fn_of_wrong_shape_or_dtype_is_a_clear_error(fn, what):
    q, k, v, _ = _inputs(4, 2, 16, "float32")
    for attend in (functools.partial(flash_attention, interpret=True, block_sizes=SMALL),
                   reference.attention):
        with pytest.raises(TypeError, match=f"ScoreFn.fn=.*returned.*{what}"):
            attend(q, k, v, score_mod=sm.ScoreFn(fn))


def test_chain_flattens_and_refuses_two_sinks():
    a, c = sm.SoftCap(2.0), sm.ALiBi(jnp.ones(4))
    assert sm.chain(None, a) is a
    assert sm.chain(a >> c, None, a).mods == (a, c, a)
    with pytest.raises(ValueError, match="more than one Sinks"):
        sm.check(sm.chain(sm.Sinks(jnp.zeros(4)), sm.Sinks(jnp.zeros(4))), 4)
    with pytest.raises(ValueError, match="score_mod=3"):
        sm.chain(a, 3)



# --- a user's subclass: a pytree without registration by hand -----------------------------------

import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class _Gain(sm.ScoreMod):
    """Written the natural way: a frozen dataclass, an array field, ``head_params``; no
    ``data_fields`` and no pytree registration (the array field is found by its value)."""

    gain: jax.Array
    offset: float = 0.0
    width = 1

    def modify(self, s, ctx):
        return s * ctx.param(0) + self.offset

    def head_params(self, num_heads):
        return jnp.asarray(self.gain, jnp.float32).reshape(num_heads, 1)


def test_a_users_subclass_is_a_pytree_and_runs_in_the_flash_kernel():
    n, kh = HEADS["gqa4"]
    mod = _Gain(jnp.linspace(0.5, 1.5, n), offset=0.25)
    leaves, treedef = jax.tree.flatten(mod)
    assert len(leaves) == 1 and leaves[0] is mod.gain  # the array; offset is static
    rebuilt = sm.rebuild(sm.Structure(treedef))  # what a kernel holds: None leaves
    assert type(rebuilt) is _Gain and rebuilt.gain is None and rebuilt.offset == 0.25
    q, k, v, do = _inputs(n, kh, 16, "float32")
    out, grads = _kernel_value_and_grads(M.Causal(), q, k, v, do, mod, {})
    want_out, want_grads = _reference_value_and_grads(M.Causal(), q, k, v, do, mod, {})
    _assert_close("out", out, want_out, TOL["float32"]["fwd"])
    assert np.abs(np.asarray(want_grads[3].gain)).max() > 0
    _assert_close("dgain", grads[3].gain, want_grads[3].gain, TOL["float32"]["grad"])
    pq, pk, pv, table, lengths = _pool([5, 33], n, kh, 16, 8, 1, "float32")
    _assert_close("paged", paged_attention(pq, pk, pv, table, lengths, score_mod=mod,
                                           interpret=True),
                  reference.paged_attention(pq, pk, pv, table, lengths, score_mod=mod),
                  TOL["float32"]["fwd"])


def test_declared_data_fields_and_static_fields():
    """``data_fields`` names the leaves (even a tuple of floats); the rest is static, in the
    structure a kernel specialises on."""
    alibi = sm.ALiBi((0.5, 0.25))
    assert jax.tree.leaves(alibi) == [0.5, 0.25]
    t5 = make_mod("t5", 4)
    assert jax.tree.structure(t5) != jax.tree.structure(
        sm.T5Bias(t5.table, num_buckets=8, max_distance=30))
    assert jax.tree.leaves(sm.chain(t5, sm.SoftCap(2.0), sm.Sinks(jnp.ones(4))))[1].shape == (4,)


def test_learned_modifiers_declare_bind_and_are_refused_unbound():
    n = 4
    mod = sm.chain(sm.SoftCap(3.0), sm.Sinks())
    declared = mod.learned(n)
    assert list(declared) == ["sink_n"] and declared["sink_n"].shape == (n,)
    assert declared["sink_n"].axes == ("heads",)
    q, k, v, _ = _inputs(n, 2, 16, "float32")
    with pytest.raises(ValueError, match=r"unbound.*sink_n"):
        reference.attention(q, k, v, score_mod=mod)
    bound = mod.bind({"sink_n": jnp.ones(n), "other": None}, n)
    assert not bound.learned(n) and bound.mods[1].logits.shape == (n,)
    want = reference.attention(q, k, v, score_mod=sm.chain(sm.SoftCap(3.0),
                                                           sm.Sinks(jnp.ones(n))))
    _assert_close("bound", reference.attention(q, k, v, score_mod=bound), want,
                  TOL["float32"]["fwd"])
    with pytest.raises(ValueError, match="'sink_n' twice"):
        sm.chain(sm.Sinks(), sm.Sinks()).learned(n)

if __name__ == "__main__":
    # The worst kernel-vs-reference errors of the matrix, per dtype and quantity (absolute,
    # max over cells): python -m tests.kernels.test_score_mods
    import json
    worst = {}
    for dtype in ("float32", "bfloat16"):
        for mod_name in MODS:
            for pattern in PATTERNS:
                for heads in HEADS:
                    errors = _check_case(mod_name, pattern, heads, dtype)
                    jax.clear_caches()  # see _release_compiled
                    for name, err in errors.items():
                        key = (dtype, name)
                        worst[key] = max(worst.get(key, (0.0, None)),
                                         (float(err), f"{mod_name}/{pattern}/{heads}"))
    print("| dtype | quantity | worst abs error | cell |\n|---|---|---|---|")
    for (dtype, name), (err, cell) in worst.items():
        print(f"| {dtype} | {name} | {err:.2e} | {cell} |")
    print(json.dumps({f"{d}/{n}": e for (d, n), (e, _) in worst.items()}))
