"""Quantised KV caches (tx.attention.quant): round-trip bounds, KIVI's sealing, decoding
against the fp32 cache, beams on shared quantised pages, the planner, and bad input."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx import flags as tx_flags
from tx import models
from tx.attention import quant
from tx.attention.paged import PagedKVCache
from tx.data.text import stdlib_corpus
from tx.flags import model_config
from tx.inference import Contiguous, Paged, beam_search, generate, generation, kv_cache_bytes
from tx.inference import memory
from tx.train import configs as configs_lib
from tx.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
V = 64


def _decoder(attention="gqa", **kw):
    return models.build(model_config(attention=attention, window=4, vocab_size=V, d_model=32,
                                     num_layers=2, d_ff=64, **kw))


def _prompt(b=3, t=5, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 8, V)


def _kv(shape=(2, 16, 3, 8), seed=0, outliers=False):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    if outliers:  # a few channels far off zero in every token, as keys have (KIVI, KVQuant)
        x = x.at[..., 1].add(20.0).at[..., 5].add(-15.0)
    return x


# -- schemes: round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_int8_round_trip_within_half_a_step(scale_dtype):
    x = _kv()
    scheme = quant.Int8(scale_dtype)
    parts = scheme.quantise(x)
    assert parts["codes"].dtype == jnp.int8 and parts["scale"].shape == x.shape[:-1]
    assert parts["scale"].dtype == scale_dtype
    err = jnp.abs(scheme.dequantise(parts, jnp.float32) - x)
    scale = parts["scale"].astype(jnp.float32)[..., None]
    amax = jnp.abs(x).max(-1, keepdims=True)
    # Half a step; a bf16 scale rounded down also clips the largest value by what it lost.
    bound = jnp.maximum(scale / 2, amax - 127 * scale) * (1 + 1e-6)
    assert bool((err <= bound).all())
    assert float(err.max()) > 0  # it does quantise


def test_int4_per_token_round_trip_and_packing():
    x = _kv()
    scheme = quant.Int4()
    parts = scheme.quantise(x)
    assert parts["codes"].dtype == jnp.uint8 and parts["codes"].shape == (2, 16, 3, 4)
    err = jnp.abs(scheme.dequantise(parts, jnp.float32) - x)
    bound = parts["scale"][..., None] / 2 * (1 + 1e-5) + 1e-6
    assert bool((err <= bound).all())
    codes = jax.random.randint(jax.random.key(1), (4, 6, 2), 0, 16).astype(jnp.uint8)
    for axis in (0, 1):
        np.testing.assert_array_equal(quant.unpack4(quant.pack4(codes, axis), axis), codes)


def test_channel_int4_round_trip_per_channel():
    x = _kv((3, 2, 16, 8))  # 3 K/V heads' two pages of 16 tokens: [K, P, L, H]
    scheme = quant.ChannelInt4()
    parts = scheme.quantise(x)
    assert parts["codes"].shape == (3, 2, 8, 8) and parts["scale"].shape == (3, 2, 8)
    err = jnp.abs(scheme.dequantise(parts, jnp.float32) - x)
    assert bool((err <= parts["scale"][:, :, None] / 2 * (1 + 1e-5) + 1e-6).all())


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    x = jnp.moveaxis(_kv(outliers=True), 2, 0)  # [K, P, L, H]: each K/V head's 2 pages
    per_token = quant.Int4().dequantise(quant.Int4().quantise(x), jnp.float32)
    per_channel = quant.ChannelInt4().dequantise(quant.ChannelInt4().quantise(x), jnp.float32)
    assert float(jnp.abs(per_channel - x).mean()) < 0.25 * float(jnp.abs(per_token - x).mean())


# -- KIVI pages: sealed pages quantised once, the partial page exact -----------------------------

@pytest.mark.parametrize("chunks", [(5, 1, 1, 2, 3), (4, 9, 1)])
def test_kivi_pages_hold_sealed_pages_quantised_and_the_tail_exact(chunks):
    page, b, k, h = 4, 2, 2, 8
    total = sum(chunks)
    width = -(-total // page)
    tables = np.arange(b * width, dtype=np.int32).reshape(b, width)[:, ::-1].copy()
    kv = quant.kivi_kv()
    cache = PagedKVCache(tables, b * width, page, k, h, kv=kv)
    keys, values = _kv((b, total, k, h), 1, outliers=True), _kv((b, total, k, h), 2)
    start = 0
    for t in chunks:
        got_k, got_v, _, kv_pos = cache.update(keys[:, start:start + t], values[:, start:start + t])
        start += t
        sealed = start // page * page  # tokens on full pages
        pages = jnp.moveaxis(keys[:, :sealed].reshape(b, -1, page, k, h), 3, 0)  # K-major
        want_k = jnp.moveaxis(kv.key.dequantise(kv.key.quantise(pages), jnp.float32), 0, 3)
        want_k = want_k.reshape(b, sealed, k, h)
        want_v = kv.value.dequantise(kv.value.quantise(values[:, :sealed]), jnp.float32)
        np.testing.assert_array_equal(got_k[:, :sealed], want_k)
        np.testing.assert_array_equal(got_v[:, :sealed], want_v)
        np.testing.assert_array_equal(got_k[:, sealed:start], keys[:, sealed:start])
        np.testing.assert_array_equal(got_v[:, sealed:start], values[:, sealed:start])
        assert (np.asarray(kv_pos[0]) >= 0).sum() == start


# -- decoding ------------------------------------------------------------------------------------

def _cached_logits(model, tokens_bt, cache, chunk):
    """Logits of every position, the tokens fed to the cache ``chunk`` at a time."""
    cache.install(model, tokens_bt[:, :chunk], tokens_bt.shape[1] - chunk)
    out = [model(tokens_bt[:, i:i + chunk]) for i in range(0, tokens_bt.shape[1], chunk)]
    model.drop_cache()
    return jnp.concatenate(out, axis=1)


def test_kivi_beats_per_token_int4_on_a_model_with_outlier_key_channels():
    model = _decoder("gqa", num_kv_heads=2, attention_bias=True)
    for attn in generation.decoding_attentions(model):  # outlier key channels, as trained LMs have
        attn.k_bias_kh[...] = attn.k_bias_kh[...].at[:, 3].set(12.0).at[:, 11].set(-9.0)
    tokens = jax.random.randint(jax.random.key(4), (4, 40), 8, V)
    ref = _cached_logits(model, tokens, Paged(8), 5)
    err = {name: float(jnp.abs(_cached_logits(model, tokens, Paged(8, kv=kv()), 5) - ref).mean())
           for name, kv in (("kivi", quant.kivi_kv), ("per_token", quant.int4_per_token_kv))}
    assert err["kivi"] < 0.7 * err["per_token"], err


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory):
    """A small GQA byte LM trained for a few seconds on the built-in text."""
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    config.model.attention, config.model.num_kv_heads = "gqa", 2
    config.model.d_model, config.model.max_len, config.data.seq_len = 64, 64, 64
    t = config.train
    t.steps, t.batch_size, t.warmup_steps, t.learning_rate = 120, 16, 10, 1e-2
    t.eval_every = t.checkpoint_every = 120
    t.eval_batches, t.async_checkpoints = 1, False
    workdir = tmp_path_factory.mktemp("byte_lm")
    loop.run(config, workdir, print_fn=None)
    model, _ = loop.load_model(configs_lib.resolve(loop.saved_config(workdir)), workdir)
    return model


def _held_out_windows(n: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` windows of ``width`` token ids (``OFFSET + byte``) from the held-out split of the
    built-in text the byte LM trained on: they do not change when this repository's files do."""
    stream = stdlib_corpus().split("eval").stream
    starts = np.random.default_rng(seed).integers(0, len(stream) - width, n)
    return np.stack([stream[s:s + width] for s in starts]).astype(np.int32)


def test_int8_decoding_matches_fp32_on_a_trained_byte_lm(byte_lm):
    """Teacher-forced, the int8 cache picks fp32's next token at >= 98% of 8 x 48 held-out
    positions (fed 8 at a time; the flips are near-ties). Free-running greedy from their first
    16 tokens gives fp32's 32 tokens at >= 95%: the coarser bound, since one early flip changes
    the rest of its row."""
    windows = _held_out_windows(8, 48)
    fp32 = _cached_logits(byte_lm, jnp.asarray(windows), Paged(16), 8).argmax(-1)
    kw = dict(max_new_tokens=32)
    greedy = generate(byte_lm, windows[:, :16], cache=Paged(16), **kw).tokens
    for cache in (Paged(16, kv=quant.int8_kv()), Contiguous(kv=quant.int8_kv())):
        forced = _cached_logits(byte_lm, jnp.asarray(windows), cache, 8).argmax(-1)
        agree = float((forced == fp32).mean())
        assert agree >= 0.98, ("teacher-forced", cache, agree)
        agree = float((generate(byte_lm, windows[:, :16], cache=cache, **kw).tokens ==
                       greedy).mean())
        assert agree >= 0.95, ("greedy", cache, agree)


@pytest.mark.parametrize("kv", [quant.int8_kv, quant.int4_per_token_kv])
def test_beams_on_shared_quantised_prefix_pages_equal_a_contiguous_quantised_cache(kv):
    model, prompt = _decoder(), _prompt(t=9)  # two full prompt pages shared by the beams
    kw = dict(max_new_tokens=6, num_beams=3, length_penalty=0.0)
    contiguous = beam_search(model, prompt, cache=Contiguous(kv=kv()), **kw)
    paged = beam_search(model, prompt, cache=Paged(4, kv=kv()), **kw)
    np.testing.assert_array_equal(paged.tokens, contiguous.tokens)
    np.testing.assert_allclose(paged.scores, contiguous.scores, rtol=1e-5, atol=1e-5)


def test_kivi_beams_fork_the_tail_and_share_sealed_pages():
    """Beams after a prompt that ends mid-page: each beam's copy of that page stays in full
    precision (the tail), so KIVI beams equal the same beams run one prompt at a time."""
    model, prompt = _decoder(), _prompt(b=2, t=6)
    kw = dict(max_new_tokens=5, num_beams=3, length_penalty=0.0, cache=Paged(4, kv=quant.kivi_kv()))
    both = beam_search(model, prompt, **kw)
    one = beam_search(model, prompt[1:], **kw)  # the second row alone
    np.testing.assert_array_equal(one.tokens[0], both.tokens[1])
    np.testing.assert_allclose(one.scores[0], both.scores[1], rtol=1e-5, atol=1e-5)


def test_rolling_cache_quantised_matches_paged():
    model, prompt = _decoder("gqa+local"), _prompt()
    rolling = generate(model, prompt, max_new_tokens=10, cache=Contiguous(kv=quant.int8_kv()))
    paged = generate(model, prompt, max_new_tokens=10, cache=Paged(4, kv=quant.int8_kv()))
    np.testing.assert_array_equal(rolling.tokens, paged.tokens)


# -- the planner -----------------------------------------------------------------------------------

def _allocated(model) -> int:
    """Bytes of the K/V storage the installed caches hold (tables and counters aside)."""
    total = 0
    for attn in generation.decoding_attentions(model):
        c = attn.cache
        stores = [c.k, c.v] if hasattr(c, "k") else [c.k_pages, c.v_pages]
        total += sum(x[...].nbytes for store in stores for x in store.values())
        total += sum(t[...].nbytes for t in (getattr(c, "k_tail", None), getattr(c, "v_tail", None))
                     if t is not None)
    return total


@pytest.mark.parametrize("attention", ["gqa", "gqa+local"])
@pytest.mark.parametrize("dtype,page", [("float32", None), ("bfloat16", None), ("int8", None),
                                        ("int4", None), ("float32", 4), ("int8", 4),
                                        ("int4", 4), ("int4_per_token", 4)])
def test_planner_equals_the_allocated_caches(attention, dtype, page):
    model, prompt = _decoder(attention), _prompt(b=3, t=7)
    kv = memory.kv_storage_of(dtype, page)
    cache = Contiguous(kv=kv) if page is None else Paged(page, kv=kv)
    cache.install(model, prompt, 10)
    allocated = _allocated(model)
    model.drop_cache()
    assert kv_cache_bytes(model.config, 3, 17, dtype=dtype, page_size=page) == allocated


def test_storage_is_memoised_for_frozen_schemes_and_traced_for_mutable_ones():
    calls = []

    class Mutable:  # a researcher's own scheme: unhashable, so never memoised
        __hash__ = None

        def quantise(self, x):
            calls.append(x.shape)
            return quant.Int8().quantise(x)

    for _ in range(2):
        got = quant.storage(Mutable(), (2, 5, 8), jnp.float32)
    assert len(calls) == 2
    want = quant.storage(quant.Int8(), (2, 5, 8), jnp.float32)
    assert {n: (s.shape, s.dtype) for n, s in got.items()} == \
        {n: (s.shape, s.dtype) for n, s in want.items()}
    assert quant.storage(quant.Int8(), (2, 5, 8)) == want  # a memoised copy, equal
    assert quant.storage(quant.Int8(), (2, 5, 8)) is not want  # callers may change theirs


def test_planner_formula_and_largest_batch():
    cfg = _decoder("gqa", num_kv_heads=2).config  # 2 layers, 2 K/V heads of 8
    assert kv_cache_bytes(cfg, 2, 100, dtype="bfloat16") == 2 * 2 * 2 * 8 * 2 * 100 * 2
    int8 = kv_cache_bytes(cfg, 2, 100, dtype="int8")
    assert int8 == 2 * 2 * 2 * (8 + 4) * 100 * 2  # codes plus one fp32 scale per token/head
    assert kv_cache_bytes(cfg, 2, 100, dtype="int8", page_size=16) == int8 // 100 * 112
    per_seq = kv_cache_bytes(cfg, 1, 100, dtype="int8")
    assert memory.largest_batch(cfg, 100, 10 * per_seq + 1, dtype="int8") == 10
    local = _decoder("gqa+local", num_kv_heads=2).config  # window 4: a ring of 4 slots
    assert kv_cache_bytes(local, 1, 100) == 2 * 2 * 2 * 8 * 4 * 4


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: tx_flags.cache("paged", kv_dtype="int3"), "kv_dtype='int3'"),
    (lambda: tx_flags.cache("contiguous", kv_dtype="int4"), "kv_dtype='int4'.*paged"),
    (lambda: tx_flags.cache("none", kv_dtype="int8"), "kv_dtype='int8'"),
    (lambda: PagedKVCache(np.zeros((1, 2), np.int32), 2, 5, 2, 8, kv=quant.kivi_kv()),
     "cache.page_size=5"),
    (lambda: PagedKVCache(np.zeros((1, 2), np.int32), 2, 4, 2, 7,
                          kv=quant.int4_per_token_kv()), "head_dim=7"),
    (lambda: Paged(4, kv="int8"), "cache.kv='int8'"),
    (lambda: quant.Int8(jnp.float16), "scale_dtype"),
    (lambda: kv_cache_bytes(_decoder().config, 1, 8, dtype="fp8"), "dtype='fp8'"),
    (lambda: kv_cache_bytes(_decoder().config, 0, 8), "batch=0"),
])
def test_bad_input_names_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_kivi_on_a_contiguous_cache_fails_before_decoding():
    with pytest.raises(ValueError, match="paged"):
        generate(_decoder(), _prompt(), max_new_tokens=2, cache=Contiguous(kv=quant.kivi_kv()))


def test_bad_config_kv_dtype_fails_at_resolve():
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    config.inference.kv_dtype = "int2"
    with pytest.raises(configs_lib.ConfigError, match="inference.kv_dtype='int2'"):
        configs_lib.resolve(config)


def test_int8_pages_go_through_the_pallas_paged_kernel(monkeypatch):
    """With ('pallas', 'xla') an int8 paged cache is read in place by the Pallas kernel, which
    dequantises in the kernel, and gives the tokens of the xla path over the same int8 pages."""
    from tx.attention import registry
    calls = []
    backend = registry._BACKENDS["pallas"]
    kernel = backend.paged

    def counting(call):
        calls.append((call.k_pages.dtype, call.k_scales is not None))
        return kernel(call)

    monkeypatch.setattr(backend, "paged", counting)
    kw = dict(attention="gqa", vocab_size=V, d_model=32, num_layers=2, d_ff=48)
    pallas = models.build(model_config(implementation=("pallas", "xla"), **kw), seed=1)
    xla = models.build(model_config(**kw), seed=1)
    prompt, cache = _prompt(b=2, t=6), Paged(4, kv=quant.int8_kv())
    got = generate(pallas, prompt, max_new_tokens=5, cache=cache)
    np.testing.assert_array_equal(got.tokens, generate(xla, prompt, max_new_tokens=5,
                                                       cache=cache).tokens)
    assert calls and all(c == (jnp.dtype(jnp.int8), True) for c in calls)
