"""FAVOR+ (tx.attention.favor): the estimator, the layer's causal and bidirectional forms,
decoding from a constant-size state, packing, redraws, hybrid schedules and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx.kernels import masks as M
from tx import models
from tx.attention import favor
from tx.flags import model_config
from tx.inference import Contiguous, Paged, Recompute, beam_search, generate, kv_cache_bytes

V = 64
HYBRID = dict(vocab_size=V, d_model=32, num_layers=4, d_ff=64, num_heads=4, num_kv_heads=2,
              window=4, linear_features=32, linear_chunk=4,
              layer_pattern="local,local,local,favor")


def _qk(seed=0, t=6, h=8, spread=0.5):
    kq, kk = jax.random.split(jax.random.key(seed))
    return (spread * jax.random.normal(kq, (t, h)), spread * jax.random.normal(kk, (t, h)))


# -- the estimator ---------------------------------------------------------------------------

def test_favor_attention_converges_to_softmax_as_features_grow():
    q, k = _qk()
    exact = jax.nn.softmax(q @ k.T, axis=-1)
    errors = []
    for f in (16, 64, 256, 1024):
        per_seed = []
        for seed in range(8):
            w = favor.orthogonal_gaussian(jax.random.key(100 + seed), f, q.shape[-1])
            qf = favor.positive_features(q, w, query=True)
            kf = favor.positive_features(k, w, query=False)
            approx = (qf @ kf.T) / (qf @ kf.T).sum(-1, keepdims=True)
            per_seed.append(float(jnp.abs(approx - exact).mean()))
        errors.append(np.mean(per_seed))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # The positive estimator's variance grows like exp(|q + k|^2) / F: slow but steady.
    assert errors[-1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("orthogonal", [True, False])
def test_features_estimate_exp_qk_without_bias(orthogonal):
    """E[phi(q) . phi(k)] = exp(q . k): the mean over 4000 independent draws of 16 features
    lies within 5 standard errors of the exact kernel for every pair (EPS aside). The
    estimator is heavy-tailed for large |q + k|, so q and k are of the size the layer's
    scaling gives them (entries ~ N(0, 0.3^2), q . k of order 1)."""
    q, k = _qk(seed=1, t=4, spread=0.3)
    draws, f = 4000, 16
    keys = jax.random.split(jax.random.key(7), draws)
    if orthogonal:
        w = jax.vmap(lambda key: favor.orthogonal_gaussian(key, f, q.shape[-1]))(keys)
    else:
        w = jax.vmap(lambda key: jax.random.normal(key, (f, q.shape[-1])))(keys)
    est = jax.vmap(lambda w: favor.positive_features(q, w, query=False)
                   @ favor.positive_features(k, w, query=False).T)(w)  # [draws, T, T]
    exact = jnp.exp(q @ k.T)
    se = est.std(0) / np.sqrt(draws)
    assert bool((jnp.abs(est.mean(0) - exact) < 5 * se + 1e-4).all())


def test_orthogonal_rows_are_orthogonal_within_a_block():
    w = favor.orthogonal_gaussian(jax.random.key(0), 20, 8)
    block = w[:8] / jnp.linalg.norm(w[:8], axis=-1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)
    assert w.shape == (20, 8)


# -- the layer -----------------------------------------------------------------------------------

def test_causal_layer_equals_the_masked_quadratic_form_of_its_features():
    model = models.build(model_config(**HYBRID))
    layer = model.tower.blocks[3].self_attn
    assert isinstance(layer, favor.FavorAttention)
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    q = jnp.einsum("BTD,DNH->BTNH", x, layer.q_dnh[...])
    k = jnp.einsum("BTD,DKH->BTKH", x, layer.k_dkh[...])
    v = jnp.einsum("BTD,DKH->BTKH", x, layer.v_dkh[...])
    q, k = layer.positions.rotate(q, k, jnp.broadcast_to(jnp.arange(11), (2, 11)))
    q_f, k_f = layer.features(q, k)
    s = jnp.einsum("BTKGF,BSKF->BKGTS", q_f.reshape(2, 11, 2, 2, -1), k_f)
    s = jnp.where(jnp.tril(jnp.ones((1, 1, 1, 11, 11), bool)), s, 0.0)
    want = jnp.einsum("BKGTS,BSKH->BTKGH", s / s.sum(-1, keepdims=True), v).reshape(2, 11, 4, 8)
    want = jnp.einsum("BTNH,NHD->BTD", want, layer.o_nhd[...])
    model.eval()
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_pallas_and_xla_give_the_same_hybrid_model():
    xla = models.build(model_config(**HYBRID), seed=2)
    pallas = models.build(model_config(implementation=("pallas", "xla"), **HYBRID), seed=2)
    tokens = jax.random.randint(jax.random.key(3), (2, 13), 0, V)
    np.testing.assert_allclose(pallas(tokens), xla(tokens), rtol=2e-5, atol=2e-5)


def test_encoder_favor_is_bidirectional_and_respects_lengths():
    model = models.build(model_config(task="mlm", **{**HYBRID, "layer_pattern": "favor"}))
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, V)
    lengths = jnp.asarray([9, 6])
    out = model(tokens, lengths_b=lengths)
    # Changing a padded token changes nothing; changing the last real one changes the first.
    padded = model(tokens.at[1, 7].set((tokens[1, 7] + 1) % V), lengths_b=lengths)
    np.testing.assert_allclose(padded[1, :6], out[1, :6], rtol=1e-5, atol=1e-5)
    later = model(tokens.at[0, 8].set((tokens[0, 8] + 1) % V), lengths_b=lengths)
    assert float(jnp.abs(later[0, 0] - out[0, 0]).max()) > 1e-6


def test_packed_documents_match_each_document_alone():
    model = models.build(model_config(**HYBRID))
    a = jax.random.randint(jax.random.key(4), (1, 7), 0, V)
    b = jax.random.randint(jax.random.key(5), (1, 6), 0, V)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[0] * 7 + [1] * 6])
    pos = jnp.asarray([list(range(7)) + list(range(6))])
    out = model(packed, positions_bt=pos, segment_ids_bt=seg)
    np.testing.assert_allclose(out[:, :7], model(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], model(b), rtol=1e-5, atol=1e-5)


# -- decoding: a constant-size state --------------------------------------------------------------

def test_state_decoding_equals_the_full_forward():
    model = models.build(model_config(**HYBRID))
    prompt = jax.random.randint(jax.random.key(0), (3, 5), 8, V)
    cached = generate(model, prompt, max_new_tokens=10)
    np.testing.assert_array_equal(cached.tokens,
                                  generate(model, prompt, max_new_tokens=10,
                                           cache=Recompute()).tokens)
    model.init_cache(3, 15)
    state = model.tower.blocks[3].self_attn.cache
    assert state.s[...].shape == (3, 2, 32, 8)  # [B, K, F, H] whatever the length
    model.drop_cache()


def test_beams_fork_the_state():
    model = models.build(model_config(**HYBRID))
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 8, V)
    beams = beam_search(model, prompt, max_new_tokens=6, num_beams=3, length_penalty=0.0)
    full = jnp.concatenate([prompt, jnp.asarray(beams.tokens)], axis=1)
    logp = jax.nn.log_softmax(model(full)[:, 4:-1])
    want = jnp.take_along_axis(logp, jnp.asarray(beams.tokens)[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(beams.scores, want, rtol=1e-4, atol=1e-4)


def test_state_bytes_in_the_planner():
    cfg = model_config(**HYBRID)
    softmax = model_config(**{**HYBRID, "layer_pattern": "local"})
    assert kv_cache_bytes(cfg, 2, 1000) - kv_cache_bytes(softmax, 2, 1000) == \
        4 * 2 * 2 * 32 * (8 + 1) - 2 * 2 * 2 * 8 * 4 * 4  # a state instead of a 4-slot ring
    assert kv_cache_bytes(cfg, 2, 1000) == kv_cache_bytes(cfg, 2, 8000)  # all constant


# -- redraws -----------------------------------------------------------------------------------

def test_features_redraw_every_n_training_calls_and_live_in_the_state():
    model = models.build(model_config(**{**HYBRID, "linear_redraw": 2}))
    layer = model.tower.blocks[3].self_attn
    tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, V)
    first = layer.features_fh[...]
    model.train()
    model(tokens)
    np.testing.assert_array_equal(layer.features_fh[...], first)
    model(tokens)
    second = layer.features_fh[...]
    assert not np.allclose(second, first) and int(layer.calls[...]) == 2
    np.testing.assert_allclose(second, layer._draw(1), atol=1e-6)  # a function of seed, count
    model.eval()
    model(tokens)
    np.testing.assert_array_equal(layer.features_fh[...], second)  # eval never redraws
    _, _, rest = nnx.split(model, nnx.Param, ...)
    assert any("features_fh" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(rest))


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: model_config(**{**HYBRID, "linear_features": 0}), "linear_features=0"),
    (lambda: model_config(**{**HYBRID, "linear_chunk": 0}), "linear_chunk=0"),
    (lambda: model_config(**{**HYBRID, "linear_redraw": -1}), "linear_redraw=-1"),
    (lambda: favor.Favor(0), "num_features"),
    (lambda: favor.Favor(pattern=M.BigBird(4, 1, 1, 1)), "Favor.pattern=BigBird"),
    (lambda: models.build(model_config(positions="t5", **HYBRID)), "positions=T5"),
])
def test_bad_input_names_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_linear_layer_in_the_paged_cache_is_refused():
    model = models.build(model_config(**HYBRID))
    prompt = jax.random.randint(jax.random.key(0), (1, 4), 8, V)
    with pytest.raises(ValueError, match="cache=Paged.*layer 3 is FavorAttention"):
        generate(model, prompt, max_new_tokens=2, cache=Paged(4))
    generate(model, prompt, max_new_tokens=2, cache=Contiguous())  # the state cache works


# -- local softmax with a gated linear global path, in one layer -------------------------------------

def test_local_global_layer_decodes_like_its_forward_and_mixes_by_its_gate():
    model = models.build(model_config(**{**HYBRID, "num_layers": 2,
                                         "layer_pattern": "local_favor,favor"}))
    layer = model.tower.blocks[0].self_attn
    assert isinstance(layer, favor.LocalGlobalAttention)
    layer.gate_n[...] = jnp.asarray([-2.0, 0.0, 1.0, 3.0])  # heads lean local ... global
    prompt = jax.random.randint(jax.random.key(6), (2, 7), 8, V)
    cached = generate(model, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(cached.tokens, generate(model, prompt, max_new_tokens=8,
                                                          cache=Recompute()).tokens)
    beams = beam_search(model, prompt, max_new_tokens=5, num_beams=2, length_penalty=0.0)
    full = jnp.concatenate([prompt, jnp.asarray(beams.tokens)], axis=1)
    logp = jax.nn.log_softmax(model(full)[:, 6:-1])
    want = jnp.take_along_axis(logp, jnp.asarray(beams.tokens)[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(beams.scores, want, rtol=1e-4, atol=1e-4)
    # A fully local gate is the local softmax layer: tokens beyond the window do not matter.
    layer.gate_n[...] = jnp.full((4,), -1e4)
    x = jax.random.normal(jax.random.key(7), (1, 10, 32))
    far = x.at[:, 0].add(1.0)  # key 0 is outside the last query's 4-key window
    np.testing.assert_allclose(layer(far)[:, -1], layer(x)[:, -1], rtol=1e-5, atol=1e-5)
    assert kv_cache_bytes(model.config, 2, 100) == kv_cache_bytes(model.config, 2, 5000)
