"""T5 <-> tx: ``T5ForConditionalGeneration`` v1.0 (relu, tied head scaled by ``d_model**-0.5``)
and v1.1 (gated-gelu, untied head, ``d_kv * heads != d_model``, deeper decoder, 8 relative
buckets up to distance 20) built with
``transformers``, saved, loaded into tx and compared on logits with a padded source (fp32, max
abs diff <= 1e-4) and greedy generation against ``transformers.generate`` token for token;
tx -> HF files -> transformers round trips; unsupported options fail by name."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
torch.set_num_threads(1)  # the CPU is shared with JAX and pytest-xdist workers

from tests.tx.hf_util import TOL, hf_model, padded_batch, save  # noqa: E402
from tx import models  # noqa: E402
from tx.flags import model_config  # noqa: E402
from tx.inference import generate  # noqa: E402
from tx.interop import hf  # noqa: E402
from tx.layers import T5Buckets  # noqa: E402

VOCAB, PAD, EOS = 97, 0, 1  # T5: decoder start = pad = 0, eos = 1
BASE = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            dropout_rate=0.0, layer_norm_epsilon=1e-6, decoder_start_token_id=PAD,
            pad_token_id=PAD, eos_token_id=EOS)
VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu"),
    # Also a bias table of its own size: 8 buckets up to distance 20 (tx reads both).
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=4,
                 num_decoder_layers=3, relative_attention_num_buckets=8,
                 relative_attention_max_distance=20),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    ref = hf_model(transformers, torch, "T5ForConditionalGeneration", "T5Config", spread=0.3,
                   **{**BASE, **VARIANTS[request.param]})
    if not ref.config.scale_decoder_outputs:  # v1.1: a head of its own, not the embeddings
        with torch.no_grad():
            ref.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn_like(ref.lm_head.weight))
    return request.param, ref, hf.load(save(tmp_path_factory, request.param, ref))


def _source(seed=0):
    return padded_batch(VOCAB, seed=seed, t=10, lengths=(10, 6, 2))


def test_logits_match_with_padded_source(pair):
    name, ref, model = pair
    src, valid, lengths = _source()
    tgt = np.random.RandomState(1).randint(3, VOCAB, (3, 7))
    tgt[:, 0] = PAD
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(src), attention_mask=torch.tensor(
            valid.astype(np.int64)), decoder_input_ids=torch.tensor(tgt)).logits.numpy()
    got = np.asarray(model(jnp.asarray(src), jnp.asarray(tgt),
                           source_lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - want).max() <= TOL, name
    cfg = model.config
    assert cfg.head.tie == (name == "v1_0")
    assert cfg.head.scale == (32 ** -0.5 if name == "v1_0" else 1.0)
    assert cfg.positions == (T5Buckets(8, 20) if name == "v1_1" else T5Buckets(32, 128))


def test_greedy_generation_matches(pair):
    name, ref, model = pair
    src, valid, lengths = _source(seed=2)
    new = 8
    # transformers sizes its decoding cache by num_layers, not num_decoder_layers: no cache then.
    cache = ref.config.num_decoder_layers == ref.config.num_layers
    with torch.no_grad():
        out = ref.generate(torch.tensor(src), attention_mask=torch.tensor(
            valid.astype(np.int64)), do_sample=False, num_beams=1, max_new_tokens=new,
            use_cache=cache).numpy()[:, 1:]  # drop the decoder start token
    want = np.zeros((3, new), np.int64)
    want[:, :out.shape[1]] = out  # HF stops once every row is done; tx pads with PAD = 0
    got = generate(model, np.full((3, 1), PAD), max_new_tokens=new, stop_tokens=(EOS,),
                   source_bs=src, source_lengths_b=lengths)
    np.testing.assert_array_equal(got.tokens, want, err_msg=name)
    assert len(set(want.ravel().tolist())) > 3  # not a degenerate constant output


# -- tx -> HF files -> transformers --------------------------------------------------------------
@pytest.mark.parametrize("activation, tied", [("relu", True), ("geglu", False)])
def test_round_trip_to_transformers(activation, tied, tmp_path):
    cfg = model_config(task="seq2seq", vocab_size=VOCAB, d_model=32,
                      num_layers=2, num_heads=4, d_ff=48, activation=activation, norm="rmsnorm",
                      positions="t5", attention="full", attention_scale=1.0,
                      tie_embeddings=tied, head_scale=32 ** -0.5 if tied else 1.0)
    model = models.build(cfg, seed=3)
    rng = np.random.RandomState(4)  # non-trivial norms and biases: a dropped one shows
    hf.load_weights(model, {k: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
                            for k, v in hf.state_dict(model).items()})
    hf.save(model, tmp_path)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    src, valid, lengths = _source(seed=5)
    tgt = np.random.RandomState(6).randint(3, VOCAB, (3, 5))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(src), attention_mask=torch.tensor(
            valid.astype(np.int64)), decoder_input_ids=torch.tensor(tgt)).logits.numpy()
    got = np.asarray(model(jnp.asarray(src), jnp.asarray(tgt),
                           source_lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - want).max() <= TOL
    ref.save_pretrained(tmp_path / "again")  # ... and back: HF's own files load unchanged
    again = hf.load(tmp_path / "again")
    assert again.config == model.config
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(src), jnp.asarray(tgt))),
                               np.asarray(model(jnp.asarray(src), jnp.asarray(tgt))), atol=1e-6)


# -- unsupported options fail by name ------------------------------------------------------------
@pytest.mark.parametrize("change, option", [
    (dict(feed_forward_proj="gated-relu"), "feed_forward_proj"),
    (dict(relative_attention_num_buckets=7), "num_buckets=7"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(architectures=["T5EncoderModel"]), "architectures"),
])
def test_unsupported_option_raises_naming_it(change, option):
    config = dict(model_type="t5", **BASE)
    config.update(change)
    with pytest.raises(ValueError, match=option):
        hf.config_from_hf(config)
