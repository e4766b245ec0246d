"""Multi-head latent attention (``tx.attention.mla``): flags, refusals, training through the
expanded form, decoding from the latent (absorbed form) on the contiguous and paged caches,
int8 latent pages, beams, prefix sharing, and the planner's bytes.

One tiny decoder (an MLA layer with q compression, then a softmax layer) is shared by the
decoding tests (module-scoped); forwards are jitted once per cache kind.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tx import flags, models
from tx.attention import mla, quant
from tx.attention.mla import MLA, MLAttention
from tx.flags import model_config
from tx.inference import Contiguous, Paged, beam_search, generate, generation
from tx.kernels import masks
from tx.inference import kv_cache_bytes, memory
from tx.research import ablation
from tx.train import configs as configs_lib
from tx.train import init_state, make_train_step
from tx.train.loop import kv_bytes_per_token

V = 64
BASE = dict(vocab_size=V, d_model=32, num_layers=2, d_ff=64, num_heads=4, positions="rope",
            layer_pattern="mla,full", mla_kv_rank=16, mla_rope_dim=8, mla_nope_dim=8,
            mla_v_dim=12, mla_q_rank=24, implementation=("xla",))


@pytest.fixture(scope="module")
def model():
    return models.build(model_config(**BASE), seed=0)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 11), 1, V)


@pytest.fixture(scope="module")
def fwd():
    return nnx.jit(lambda m, x: m(x))


def test_flags_print_back_and_build_decoders_and_encoders():
    cfg = model_config(**{**BASE, "layer_pattern": "mla,mla,full", "num_layers": 3})
    assert cfg.attention.masks[0] == MLA(16, 8, 8, 12, q_lora_rank=24)
    printed = flags.to_flags(cfg)
    assert tuple(printed["layer_pattern"]) == ("mla", "mla", "full")
    assert model_config(**printed) == cfg
    plain = model_config(**{**BASE, "layer_pattern": (), "attention": "mla", "mla_q_rank": 0})
    assert plain.attention.masks == (MLA(16, 8, 8, 12),)
    assert model_config(**flags.to_flags(plain)) == plain
    # An encoder: the same layer, bidirectional.
    enc = models.build(model_config(**{**BASE, "task": "mlm"}), seed=0)
    layer = enc.encoder.tower.blocks[0].self_attn
    assert isinstance(layer, MLAttention) and layer.q_dnh is None
    assert layer.mask == masks.Full()
    assert layer.kv_a_dr[...].shape == (32, 16 + 8) and layer.o_nhd[...].shape == (4, 12, 32)


@pytest.mark.parametrize("change, match", [
    (dict(mla_kv_rank=40), "kv_lora_rank=40 is larger than d_model=32"),
    (dict(mla_q_rank=33), "q_lora_rank=33 is larger than d_model=32"),
    (dict(mla_rope_dim=7), "qk_rope_head_dim .*=7 is odd"),
    (dict(positions="alibi"), "needs RoPE positions"),
    (dict(positions="learned"), "needs RoPE positions"),
    (dict(attention_qk_norm=True), "attention.qk_norm=True is not part of an MLA layer"),
    (dict(layer_pattern="mla", num_kv_heads=2), "num_kv_heads=2 would be dropped"),
])
def test_bad_input_is_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        models.build(model_config(**{**BASE, **change}), seed=0)


def test_expanded_form_trains():
    optimizer = optax.adam(1e-2)
    state = init_state(models.build(model_config(**BASE), seed=0), optimizer)
    step = make_train_step(state.graphdef, optimizer)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(1, V, (2, 12)), jnp.int32)
    batch = {"inputs": toks, "targets": jnp.roll(toks, -1, axis=1),
             "weights": jnp.ones((2, 12), jnp.float32), "lengths": jnp.array([12, 9], jnp.int32)}
    params, rest, opt_state = state.arrays()
    before = jax.tree.map(np.array, params["tower"]["blocks"][0]["self_attn"])  # (donated)
    losses = []
    for _ in range(4):
        params, rest, opt_state, metrics = step(params, rest, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    # Every MLA parameter moved (each got a gradient).
    for name in ("q_a_dr", "q_b_rnh", "kv_a_dr", "k_b_rnh", "v_b_rnh", "o_nhd"):
        old = before[name][...]
        new = params["tower"]["blocks"][0]["self_attn"][name][...]
        assert not np.allclose(old, new), name


def _decode_logits(model, fwd, tokens, cache, split=5):
    """Prefill ``tokens[:, :split]`` into ``cache``, then one token per step."""
    cache.install(model, tokens, 0 if isinstance(cache, Contiguous) else 1)
    try:
        outs = [fwd(model, tokens[:, :split])]
        outs += [fwd(model, tokens[:, i:i + 1]) for i in range(split, tokens.shape[1])]
        layer = model.tower.blocks[0].self_attn
        stored = layer.cache
    finally:
        model.drop_cache()
    return np.concatenate(outs, axis=1), stored


@pytest.mark.parametrize("cache, tol", [
    (Contiguous(), 1e-5), (Paged(page_size=4), 1e-5),
    # int8 latent (per-token scales): measured max |dlogit| 0.038 on this model.
    (Paged(page_size=4, kv=quant.int8_kv()), 0.05), (Contiguous(kv=quant.int8_kv()), 0.05)])
def test_absorbed_decoding_equals_the_expanded_form(model, tokens, fwd, cache, tol):
    full = fwd(model, tokens)
    got, stored = _decode_logits(model, fwd, tokens, cache)
    np.testing.assert_allclose(got, full, atol=tol, rtol=tol)
    np.testing.assert_array_equal(got.argmax(-1), np.asarray(full).argmax(-1))
    # The latent is stored once per token: one "head" of width r + dr, no V store.
    if isinstance(cache, Paged):
        assert stored.v_pages is None
        assert next(iter(stored.k_pages.values()))[...].shape[::3] == (1, 16 + 8)
    else:
        assert stored.v is None
        assert next(iter(stored.k.values()))[...].shape[2:] == (1, 16 + 8)


def test_generate_and_beams_give_the_same_tokens_on_every_cache(model):
    # Rows 0 and 2 share their prompt: the paged cache stores its full pages once.
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (2, 9), 1, V))
    prompt = np.concatenate([prompt, prompt[:1]])
    # The contiguous latent cache equals the expanded form (above): the reference here.
    want = generate(model, prompt, max_new_tokens=6, cache=Contiguous()).tokens
    assert (want[0] == want[2]).all()
    # (int8 latent pages: their logits are checked above.)
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=6,
                                           cache=Paged(page_size=4)).tokens, want)
    pool = generation.init_paged_cache(model, prompt, 6, page_size=4)
    model.drop_cache()
    assert pool.num_pages - pool.num_free_pages < 3 * 4  # two of the rows share full pages
    beams = [beam_search(model, prompt[:2], max_new_tokens=4, num_beams=3, cache=c)
             for c in (Contiguous(), Paged(page_size=4))]
    np.testing.assert_array_equal(beams[0].tokens, beams[1].tokens)
    np.testing.assert_allclose(beams[0].scores, beams[1].scores, atol=1e-4)


def _allocated(model) -> int:
    total = 0
    for attn in generation.decoding_attentions(model):
        c = attn.cache
        for store in ((c.k, c.v) if hasattr(c, "k") else (c.k_pages, c.v_pages)):
            total += 0 if store is None else sum(x[...].nbytes for x in store.values())
        for tail in (getattr(c, "k_tail", None), getattr(c, "v_tail", None)):
            total += 0 if tail is None else tail[...].nbytes
    return total


@pytest.mark.parametrize("dtype, page", [("float32", None), ("int8", None), ("float32", 4),
                                         ("int8", 4), ("int4", 4)])
def test_planner_counts_the_latent(model, dtype, page):
    kv = memory.kv_storage_of(dtype, page)
    prompt = np.ones((3, 7), np.int32)
    (Contiguous(kv=kv) if page is None else Paged(page, kv=kv)).install(model, prompt, 10)
    allocated = _allocated(model)
    model.drop_cache()
    assert kv_cache_bytes(model.config, 3, 17, dtype=dtype, page_size=page) == allocated
    if (dtype, page) == ("float32", None):  # the MLA layer: r + dr = 24 values per token
        mha = 2 * 4 * 8  # the softmax layer: K and V, 4 heads of 8
        assert allocated == 3 * 17 * 4 * (24 + mha)


def test_value_dim_is_checked():
    with pytest.raises(ValueError, match="value_dim=30"):
        mla.cache_lib.KVCache(1, 4, 1, 24, value_dim=30)


def test_rolling_latent_cache_keeps_no_values():
    """A causal window over a latent cache: the ring holds keys only; values are their first
    ``value_dim`` columns."""
    ring = mla.cache_lib.make_cache(masks.Local(2), 1, 8, 1, 6, value_dim=4)
    assert isinstance(ring, mla.cache_lib.RollingKVCache) and ring.v is None
    new = jax.random.normal(jax.random.key(3), (1, 5, 1, 6))
    k, v, _, kv_pos = ring.update(new, None)
    np.testing.assert_array_equal(v, k[..., :4])
    np.testing.assert_array_equal(k[:, 3:], new)  # the ring was empty: new tokens last
    assert kv_pos.shape == (1, 3 + 5)


def test_the_mla_ablation_compares_at_equal_kv_bytes_per_token():
    """configs/ablation.py:mla: MLA's two ranks cache exactly GQA-2's and MQA's bytes per
    token (the table's KV bytes/token column), on both tasks."""
    root = pathlib.Path(__file__).resolve().parents[2]
    config = configs_lib.load_file(root / "configs" / "ablation.py", "mla")
    tasks = ablation._task_configs(config)  # each task with the shared variants
    assert set(tasks) == {"mqar", "lm"}
    for task in tasks.values():
        per_token = {name: kv_bytes_per_token(configs_lib.model_config(v.model))
                     for name, v in ablation.variant_configs(task).items()}
        assert per_token["mla_64"] == per_token["gqa"] == per_token["mha"] // 2
        assert per_token["mla_32"] == per_token["mqa"] == per_token["mha"] // 4
        mla_cfg = configs_lib.model_config(ablation.variant_configs(task)["mla_32"].model)
        assert kv_cache_bytes(mla_cfg, 1, 100) == 100 * per_token["mla_32"]


def test_the_run_line_names_the_latent_not_kv_heads():
    """A run's ``model:`` line gives MLA layers' latent width; K/V heads only while some
    layer still has them."""
    import types  # noqa: PLC0415
    from tx.train.loop import model_summary  # noqa: PLC0415

    def line(**kw):
        resolved = types.SimpleNamespace(model=model_config(**{**BASE, **kw}), config=types.
                                         SimpleNamespace(model={"attention": None}))
        return model_summary(resolved, {})
    assert line().endswith("4 heads, 4 K/V heads, MLA latent 24 values/token")
    assert line(layer_pattern="mla").endswith("4 heads, MLA latent 24 values/token")
