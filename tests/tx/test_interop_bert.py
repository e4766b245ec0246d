"""BERT <-> tx: ``BertForMaskedLM`` / ``SequenceClassification`` / ``TokenClassification`` built
with ``transformers``, saved, loaded into tx and compared on padded batches (fp32, max abs logit
diff <= 1e-4), with and without token types; tx -> HF files -> transformers round trips;
unsupported options fail by name."""

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
from tx.interop.hf.common import activation_of  # noqa: E402
from tx.interop import hf  # noqa: E402

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VARIANTS = {
    "mlm": ("BertForMaskedLM", {}),  # exact-erf gelu, tied decoder + vocab bias
    "mlm_untied_tanh_gelu": ("BertForMaskedLM", dict(tie_word_embeddings=False,
                                                     hidden_act="gelu_new", type_vocab_size=3)),
    "seq_cls": ("BertForSequenceClassification", dict(num_labels=3)),
    "token_cls": ("BertForTokenClassification", dict(num_labels=5)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    cls_name, extra = VARIANTS[request.param]
    ref = hf_model(transformers, torch, cls_name, "BertConfig", spread=0.2, **{**BASE, **extra})
    return request.param, ref, hf.load(save(tmp_path_factory, request.param, ref))


def _hf_logits(ref, ids, valid, token_types=None):
    kw = {} if token_types is None else {"token_type_ids": torch.tensor(token_types)}
    with torch.no_grad():
        return ref(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)),
                   **kw).logits.numpy()


def _max_diff(got, want, valid):
    diff = np.abs(got - want)
    return diff.max() if diff.ndim == 2 else diff[valid].max()  # per-token: valid rows only


def test_logits_match_on_padded_batch(pair):
    name, ref, model = pair
    ids, valid, lengths = padded_batch(VOCAB)
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    want = _hf_logits(ref, ids, valid)
    assert got.shape == want.shape
    assert _max_diff(got, want, valid) <= TOL, name
    # Sentence-pair token types: types after position 4 are 1 (the last type for 3 types).
    types = np.where(np.arange(12)[None, :] < 4, 0, ref.config.type_vocab_size - 1)
    types = np.broadcast_to(types, ids.shape).astype(np.int64)
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths),
                           token_types_bt=jnp.asarray(types, jnp.int32)))
    assert _max_diff(got, _hf_logits(ref, ids, valid, types), valid) <= TOL, name


def test_config_mapping(pair):
    name, ref, model = pair
    cfg = model.config
    assert (cfg.norm.pre, cfg.embed.norm, cfg.norm.eps, cfg.positions.max_len) == \
        (False, True, 1e-12, 32)
    assert activation_of(cfg) == ("gelu" if "tanh" in name else "gelu_exact")
    assert getattr(cfg.head, "num_classes", None) == {"seq_cls": 3, "token_cls": 5}.get(name)


# -- tx -> HF files -> transformers --------------------------------------------------------------
ROUND_TRIP = {
    "mlm": ("AutoModelForMaskedLM", dict(task="mlm", head_transform=True)),
    "seq_cls": ("AutoModelForSequenceClassification", dict(task="seq_cls", pooler="cls",
                                                           num_classes=4)),
}


@pytest.mark.parametrize("task", sorted(ROUND_TRIP))
def test_round_trip_to_transformers(task, tmp_path):
    auto, extra = ROUND_TRIP[task]
    cfg = model_config(vocab_size=VOCAB, d_model=32, num_layers=2,
                      num_heads=4, d_ff=48, max_len=16, activation="gelu_exact",
                      norm="layernorm", pre_norm=False, positions="learned", attention="full",
                      norm_eps=1e-12, attention_bias=True, mlp_bias=True, type_vocab_size=2,
                      embed_norm=True, head_bias=True, **extra)
    model = models.build(cfg, seed=3)
    rng = np.random.RandomState(4)  # non-trivial norms and biases: a dropped one shows
    tensors = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
               for k, v in hf.state_dict(model).items()}
    hf.load_weights(model, tensors)
    hf.save(model, tmp_path)
    ref = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == hf.hf_config_from(cfg)["architectures"][0]
    ids, valid, lengths = padded_batch(VOCAB, seed=5)
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert _max_diff(got, _hf_logits(ref, ids, valid), valid) <= TOL
    ref.save_pretrained(tmp_path / "again")  # ... and back: HF's own files load unchanged
    again = hf.load(tmp_path / "again")
    assert again.config == model.config
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids))),
                               np.asarray(model(jnp.asarray(ids))), atol=1e-6)


# -- unsupported options fail by name ------------------------------------------------------------
@pytest.mark.parametrize("change, option", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(hidden_act="silu"), "hidden_act"),
    (dict(architectures=["BertForQuestionAnswering"]), "architectures"),
])
def test_unsupported_option_raises_naming_it(change, option):
    config = dict(model_type="bert", architectures=["BertForMaskedLM"], **BASE)
    config.update(change)
    with pytest.raises(ValueError, match=option):
        hf.config_from_hf(config)


def test_token_types_need_the_embedding():
    model = models.build(model_config(task="mlm"))
    with pytest.raises(ValueError, match="type_vocab_size"):
        model(jnp.zeros((1, 4), jnp.int32), token_types_bt=jnp.zeros((1, 4), jnp.int32))
