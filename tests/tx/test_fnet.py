"""FNet (``tx.attention.fnet``): the Fourier mixing layer value in encoder schedules, its flag
spelling, its refusal in decoders, and HF ``FNetForMaskedLM`` parity (fp32, 1e-4) with a
tx -> HF files -> transformers round trip."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx import flags, models
from tx.attention import fnet
from tx.config import AttentionConfig
from tx.flags import model_config

TINY = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=16)


def test_fourier_mix_is_real_part_of_2d_dft():
    x = np.random.RandomState(0).standard_normal((2, 8, 32)).astype(np.float32)
    want = np.fft.fft2(x, axes=(-2, -1)).real
    np.testing.assert_allclose(np.asarray(fnet.fourier_mix(jnp.asarray(x))), want, atol=1e-4)


def test_encoder_schedule_fnet_full_forward_grad_and_flags():
    cfg = model_config(task="mlm", layer_pattern="fnet,full", **TINY)
    assert cfg.attention.masks[0] == fnet.FNet()
    printed = flags.to_flags(cfg)  # prints back, and rebuilds the same config
    assert tuple(printed["layer_pattern"]) == ("fnet", "full")
    assert model_config(**printed) == cfg
    model = models.build(cfg, seed=0)
    rng = np.random.RandomState(1)
    batch = {"inputs": jnp.asarray(rng.randint(1, 61, (2, 12)), jnp.int32),
             "targets": jnp.asarray(rng.randint(1, 61, (2, 12)), jnp.int32),
             "weights": jnp.asarray(rng.rand(2, 12) < 0.3, jnp.float32),
             "lengths": jnp.asarray([12, 7], jnp.int32)}
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return cfg.head.loss(nnx.merge(graph, p, rest), batch)[0]

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(params)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    # a few SGD steps lower the loss: the mixed schedule trains
    for _ in range(5):
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        later, grads = step(params)
    assert float(later) < float(value)


def test_fnet_in_a_decoder_is_refused_by_name():
    with pytest.raises(ValueError, match="fnet"):
        model_config(task="lm", layer_pattern="fnet,full", **TINY)
    cfg = model_config(task="lm", **TINY)
    bad = dataclasses.replace(cfg, attention=AttentionConfig(num_heads=4, num_kv_heads=4,
                                                             masks=(fnet.FNet(),)))
    with pytest.raises(ValueError, match="FNet"):
        models.build(bad)


def test_packed_rows_are_refused():
    model = models.build(model_config(task="mlm", layer_pattern="fnet", **TINY))
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids_bt=jnp.ones((1, 8), jnp.int32))


# -- HF FNetForMaskedLM --------------------------------------------------------------------------
VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
            max_position_embeddings=32, type_vocab_size=4, hidden_dropout_prob=0.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.set_num_threads(1)
    from tests.tx.hf_util import hf_model, save
    from tx.interop import hf
    ref = hf_model(transformers, torch, "FNetForMaskedLM", "FNetConfig", spread=0.2, **BASE)
    return torch, transformers, ref, hf.load(save(tmp_path_factory, "fnet", ref))


def _hf_logits(torch, ref, ids, types=None):
    kw = {} if types is None else {"token_type_ids": torch.tensor(types)}
    with torch.no_grad():
        return ref(torch.tensor(ids), **kw).logits.numpy()


def test_hf_logits_match_on_padded_batch(pair):
    from tests.tx.hf_util import TOL, padded_batch
    torch, _, ref, model = pair
    ids, _, lengths = padded_batch(VOCAB)
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    want = _hf_logits(torch, ref, ids)  # FNet takes no attention mask: padding is mixed in
    assert np.abs(got - want).max() <= TOL
    types = np.broadcast_to(np.where(np.arange(12) < 4, 0, 3), ids.shape).astype(np.int64)
    got = np.asarray(model(jnp.asarray(ids), token_types_bt=jnp.asarray(types, jnp.int32)))
    assert np.abs(got - _hf_logits(torch, ref, ids, types)).max() <= TOL


def test_hf_round_trip_to_transformers(pair, tmp_path):
    from tests.tx.hf_util import TOL, padded_batch
    from tx.interop import hf
    torch, transformers, _, model = pair
    assert hf.model_type_of(model.config) == "fnet"
    hf.save(model, tmp_path)
    ref = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == "FNetForMaskedLM"
    ids, _, _ = padded_batch(VOCAB, seed=5)
    got = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(got - _hf_logits(torch, ref, ids)).max() <= TOL


@pytest.mark.parametrize("change, option", [
    (dict(hidden_act="silu"), "hidden_act"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(architectures=["FNetForPreTraining"]), "architectures"),
])
def test_hf_unsupported_option_raises_naming_it(change, option):
    from tx.interop import hf
    config = dict(model_type="fnet", architectures=["FNetForMaskedLM"], **BASE)
    config.update(change)
    with pytest.raises(ValueError, match=option):
        hf.config_from_hf(config)
