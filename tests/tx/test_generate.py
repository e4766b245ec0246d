"""Generation: caches agree with full recompute; sampling filters; beam search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx import models
from tx.flags import model_config
from tx.inference import generation as generate_lib
from tx.inference.beam import beam_search
from tx.inference.generation import Paged, Recompute, generate
from tx.inference.sampling import Greedy, Sample, filter_logits

V = 64


def _decoder(attention, **kw):
    return models.build(model_config(attention=attention, window=4, stride=3, vocab_size=V,
                                    d_model=32, num_layers=2, d_ff=64, **kw))


def _seq2seq():
    return models.build(model_config(task="seq2seq", vocab_size=V,
                                    d_model=32, num_layers=1, d_ff=64, attention="gqa"))


def _prompt(b=3, t=5, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 8, V)


def _sequence_logp(model, prompt, tokens):
    full = jnp.concatenate([prompt, jnp.asarray(tokens)], axis=1)
    logp = jax.nn.log_softmax(model(full)[:, prompt.shape[1] - 1:-1])
    return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0].sum(-1)


@pytest.mark.parametrize("attention", ["gqa", "gqa+local", "mqa+sparse"])
@pytest.mark.parametrize("strategy", [Greedy(), Sample(0.8, top_k=10, top_p=0.9)])
def test_cache_matches_recompute(attention, strategy):
    model, prompt = _decoder(attention), _prompt()
    cached = generate(model, prompt, max_new_tokens=12, strategy=strategy, seed=3)
    recomputed = generate(model, prompt, max_new_tokens=12, strategy=strategy, seed=3,
                          cache=Recompute())
    np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
    assert cached.tokens.shape == (3, 12) and (cached.lengths == 12).all()


@pytest.mark.parametrize("attention", ["gqa", "gqa+local"])
def test_paged_cache_matches_contiguous_with_shared_prompts(attention):
    model, prompt = _decoder(attention), _prompt()
    prompt = prompt.at[1].set(prompt[0])  # rows 0 and 1 share their full prompt pages
    pool = generate_lib.init_paged_cache(model, prompt, 12, page_size=4)
    model.drop_cache()
    shared = set(pool.pages(0)) & set(pool.pages(1))
    assert len(shared) == prompt.shape[1] // 4  # the one full prompt page
    paged = generate(model, prompt, max_new_tokens=12, cache=Paged(4))
    contiguous = generate(model, prompt, max_new_tokens=12)
    np.testing.assert_array_equal(paged.tokens, contiguous.tokens)
    np.testing.assert_array_equal(paged.tokens[0], paged.tokens[1])


def test_greedy_is_the_argmax_continuation():
    model, prompt = _decoder("gqa"), _prompt(b=2)
    out = generate(model, prompt, max_new_tokens=4).tokens
    seq = prompt
    for i in range(4):
        nxt = jnp.argmax(model(seq)[:, -1], axis=-1)
        np.testing.assert_array_equal(out[:, i], nxt)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)


def test_stop_tokens_end_rows_with_pad():
    model, prompt = _decoder("gqa"), _prompt()
    free = generate(model, prompt, max_new_tokens=8)
    stop = int(free.tokens[0, 2])  # row 0 emits it at step 2 (maybe earlier)
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    out = generate(model, prompt, max_new_tokens=8, stop_tokens=(stop,))
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (out.tokens[0, first + 1:] == generate_lib.PAD).all()


def test_no_recompilation_per_token_or_per_call():
    model, prompt = _decoder("gqa"), _prompt()
    generate(model, prompt, max_new_tokens=6)
    before = generate_lib._decode_cached._cache_size()
    generate(model, _prompt(seed=1), max_new_tokens=6)
    assert generate_lib._decode_cached._cache_size() == before


def test_decoding_attentions_are_the_decoder_self_attentions_in_layer_order():
    model = _seq2seq()
    got = generate_lib.decoding_attentions(model)
    assert [id(a) for a in got] == [id(a) for a in model.decoder.self_attentions()]
    encoder = {id(a) for a in model.encoder.tower.self_attentions()}
    assert encoder and not encoder & {id(a) for a in got}
    decoder = _decoder("gqa")
    assert [id(a) for a in generate_lib.decoding_attentions(decoder)] == \
        [id(b.self_attn) for b in decoder.tower.blocks]


def test_encoder_decoder_generation_cache_matches_recompute():
    model = _seq2seq()
    source, start = _prompt(b=2, t=7, seed=1), jnp.ones((2, 1), jnp.int32)
    cached = generate(model, start, max_new_tokens=6, source_bs=source)
    recomputed = generate(model, start, max_new_tokens=6, source_bs=source, cache=Recompute())
    paged = generate(model, start, max_new_tokens=6, source_bs=source, cache=Paged(4))
    np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
    np.testing.assert_array_equal(paged.tokens, recomputed.tokens)
    beams = beam_search(model, start, max_new_tokens=6, num_beams=3, source_bs=source)
    assert beams.tokens.shape == (2, 6)


def test_one_beam_is_greedy():
    model, prompt = _decoder("gqa+local"), _prompt()
    greedy = generate(model, prompt, max_new_tokens=10, stop_tokens=(9,))
    beam = beam_search(model, prompt, max_new_tokens=10, num_beams=1, stop_tokens=(9,))
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)


def test_beam_scores_are_the_sequences_log_probability():
    """Reordering the cache by parent beams is right iff the reported score equals the
    recomputed log-probability of the returned tokens."""
    model, prompt = _decoder("gqa+local"), _prompt()
    beam = beam_search(model, prompt, max_new_tokens=8, num_beams=4, length_penalty=0.0)
    np.testing.assert_allclose(beam.scores, _sequence_logp(model, prompt, beam.tokens),
                               rtol=1e-4, atol=1e-4)
    greedy = generate(model, prompt, max_new_tokens=8)
    wider = beam_search(model, prompt, max_new_tokens=8, num_beams=8, length_penalty=0.0)
    assert (wider.scores >= _sequence_logp(model, prompt, greedy.tokens) - 1e-4).mean() >= 0.5


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x)) & (np.asarray(x) > -1e30)  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)).sum() == 2
    assert kept(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False, False]]
    assert kept(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False, False]]
    assert kept(filter_logits(logits, top_p=0.71)).tolist() == [[True, True, True, False, False]]
    draws = jax.vmap(lambda k: Sample(top_k=2)(logits, k))(jax.random.split(jax.random.key(0), 200))
    assert set(np.unique(draws).tolist()) == {0, 1}


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, cache="paged"), "cache='paged': give a cache value"),
])
def test_bad_generate_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate(_decoder("gqa"), _prompt(), **kwargs)


def test_bad_sampling_values():
    for kwargs, field in ((dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=field):
            Sample(**kwargs)
    with pytest.raises(ValueError, match="source_bs"):
        generate(_seq2seq(), _prompt(), max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(_decoder("gqa"), _prompt(), max_new_tokens=2, num_beams=0)


# -- forks: beams and samples share prompt pages; copy-on-write keeps siblings apart ---------------
@pytest.mark.parametrize("page_size", [4, 5])  # the 5-token prompt ends mid-page / on a boundary
def test_paged_beam_search_equals_contiguous(page_size):
    model, prompt = _decoder("gqa"), _prompt()
    kw = dict(max_new_tokens=7, num_beams=3, length_penalty=0.0, stop_tokens=(9,))
    contiguous = beam_search(model, prompt, **kw)
    paged = beam_search(model, prompt, cache=Paged(page_size), **kw)
    np.testing.assert_array_equal(paged.tokens, contiguous.tokens)
    np.testing.assert_allclose(paged.scores, contiguous.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(paged.scores, _sequence_logp(model, prompt, paged.tokens),
                               rtol=1e-4, atol=1e-4)


def test_encoder_decoder_paged_beam_search_equals_contiguous():
    model = _seq2seq()
    source = _prompt(b=2, t=6, seed=1)
    start = jnp.full((2, 1), 1, jnp.int32)
    kw = dict(max_new_tokens=5, num_beams=3, source_bs=source, length_penalty=0.0)
    paged = beam_search(model, start, cache=Paged(4), **kw)
    contiguous = beam_search(model, start, **kw)
    np.testing.assert_array_equal(paged.tokens, contiguous.tokens)
    np.testing.assert_allclose(paged.scores, contiguous.scores, rtol=1e-5, atol=1e-5)


def test_beams_store_the_prompts_full_pages_once():
    model, prompt = _decoder("gqa"), _prompt(b=2, t=9)
    pool = generate_lib.init_paged_cache(model, prompt, 6, page_size=4, forks=3)
    model.drop_cache()
    # Per prompt: 2 full pages shared by 3 beams, 2 private pages per beam (the first a
    # copy-on-write copy of the prompt's partly filled third page).
    assert pool.num_pages == 2 * (2 + 3 * 2) and pool.num_free_pages == 0
    for seq_id in (0, 1):  # the prompts' own sequences; their forks are 2, 3 and 4, 5
        full = pool.pages(seq_id)[:2]
        assert [pool.refcount(p) for p in full] == [3, 3]
    contiguous_pages = 2 * 3 * 4  # every beam storing its whole sequence
    assert pool.num_pages < contiguous_pages


def test_fork_mid_page_then_extend_keeps_siblings_apart():
    """Two forks of one 5-token prompt (page size 4: the fork lands mid-page) append different
    tokens; each must see exactly its own sequence, so its logits equal a fresh full forward."""
    model, prompt = _decoder("gqa"), _prompt(b=1, t=5)
    generate_lib.init_paged_cache(model, prompt, 3, page_size=4, forks=2)
    model.eval()
    model(prompt)  # prefill once
    for c in generate_lib.caches(model):
        c.fork(2)
    steps = jnp.asarray([[11, 12, 13], [21, 22, 23]], jnp.int32)  # [forks, new tokens]
    for i in range(steps.shape[1]):
        logits = model(steps[:, i:i + 1])[:, -1]
    model.drop_cache()
    full = jnp.concatenate([jnp.repeat(prompt, 2, axis=0), steps], axis=1)
    np.testing.assert_allclose(logits, model(full)[:, -1], rtol=1e-5, atol=1e-5)


def test_bad_beam_cache():
    model, prompt = _decoder("gqa"), _prompt()
    with pytest.raises(ValueError, match=r"cache=Recompute\(\): beam search needs a cache"):
        beam_search(model, prompt, max_new_tokens=3, cache=Recompute())
    with pytest.raises(ValueError, match="cache.page_size=0"):
        Paged(0)


def test_paged_generation_reads_pages_with_the_pallas_kernel(monkeypatch):
    """With implementation ('pallas', 'xla') decode steps over a paged cache go through the
    Pallas paged kernel (in interpret mode here) and give the contiguous cache's tokens."""
    from tx.attention import registry
    calls = []
    backend = registry._BACKENDS["pallas"]
    kernel = backend.paged

    def counting(call):
        calls.append(call.q.shape)
        return kernel(call)

    monkeypatch.setattr(backend, "paged", counting)
    model = models.build(model_config(attention="gqa+local", window=6, vocab_size=V, d_model=24,
                                     num_layers=2, d_ff=48, implementation=("pallas", "xla")))
    prompt = _prompt(b=2, t=7)
    paged = generate(model, prompt, max_new_tokens=6, cache=Paged(4))
    contiguous = generate(model, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(paged.tokens, contiguous.tokens)
    # Decode steps (one token, [B, 1, N, H]) took the kernel; the 7-token prefill did too.
    assert (2, 1, 4, 6) in calls
    beams = beam_search(model, prompt, max_new_tokens=5, num_beams=2, cache=Paged(4),
                        length_penalty=0.0)
    np.testing.assert_allclose(beams.scores, _sequence_logp(model, prompt, beams.tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions, expect", [("rope", "served"), ("alibi", "declined"),
                                              ("t5", "declined")])
def test_contiguous_generation_reads_the_cache_with_the_cpu_kernel(monkeypatch, positions,
                                                                   expect):
    """Under the default implementations a contiguous cache's prefill and decode steps go
    through the cpu kernel's cache entry (no positions built) and give the tokens of the xla
    path over the cache's positions. A score modifier (ALiBi's slopes, T5's buckets) makes
    the kernel decline, and the registry's next implementation serves."""
    from tx.attention import registry
    calls = []
    backend = registry._BACKENDS["cpu"]
    kernel = backend.cached

    def counting(call):
        try:
            out = kernel(call)
        except NotImplementedError:
            calls.append("declined")
            raise
        calls.append(call.q.shape[:2])
        return out

    monkeypatch.setattr(backend, "cached", counting)
    config = dict(attention="gqa", positions=positions, vocab_size=V, d_model=24, num_layers=2,
                  d_ff=48)
    model = models.build(model_config(**config))
    reference = models.build(model_config(**config, implementation=("xla",)))
    prompt = _prompt(b=2, t=7)
    got = generate(model, prompt, max_new_tokens=6)
    want = generate(reference, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    if expect == "served":
        assert calls[0] == (2, 7) and (2, 1) in calls  # the prefill, then decode steps
    else:
        assert calls and set(calls) == {"declined"}


def test_paged_generation_stores_and_attends_through_the_cpu_writer(monkeypatch):
    """Under the default implementations each paged prefill and decode step stores its
    tokens and attends in one cpu kernel call; the tokens are the contiguous cache's, and
    beams on shared pages score as a fresh forward pass does."""
    from tx.attention import registry
    calls = []
    backend = registry._BACKENDS["cpu"]
    writer = backend.paged_write

    def counting(call):
        calls.append(call.q.shape[:2])
        return writer(call)

    monkeypatch.setattr(backend, "paged_write", counting)
    model = models.build(model_config(attention="gqa", vocab_size=V, d_model=24, num_layers=2,
                                      d_ff=48))
    prompt = _prompt(b=2, t=7)
    paged = generate(model, prompt, max_new_tokens=6, cache=Paged(4))
    np.testing.assert_array_equal(paged.tokens, generate(model, prompt, max_new_tokens=6).tokens)
    assert calls[0] == (2, 7) and (2, 1) in calls  # the prefill, then decode steps
    beams = beam_search(model, prompt, max_new_tokens=5, num_beams=2, cache=Paged(4),
                        length_penalty=0.0)
    np.testing.assert_allclose(beams.scores, _sequence_logp(model, prompt, beams.tokens),
                               rtol=1e-4, atol=1e-4)


def test_the_paged_writer_declines_under_a_mesh(monkeypatch):
    # Per shard, each device's copy of a pool shared across batch shards would take only its
    # own rows' tokens; the paged kernels, which run per shard, serve instead.
    from tx.attention import registry
    from tx.parallel import shard
    monkeypatch.setattr(shard, "active", lambda: object())
    from tx.attention import calls
    with pytest.raises(NotImplementedError, match="does not run per shard"):
        registry._BACKENDS["cpu"].paged_write(calls.PagedWrite(*[None] * 7))
