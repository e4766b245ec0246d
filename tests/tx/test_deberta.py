"""DeBERTa-v2/v3 (``positions=deberta``, ``tx.attention.deberta``; HF ``deberta-v2``): the flag
spelling, a training step through the flash kernels (its loss the ``xla`` path's) with
gradients reaching the relative embeddings, the refusal of a decoding cache, the log buckets against
``transformers``, ``DebertaV2ForMaskedLM`` parity on a padded batch (fp32, max |logit diff| <=
1e-4; legacy and new MLM head names, c2p/p2c subsets, with and without buckets), a tx -> HF
files -> transformers round trip, and every unsupported option refused by name."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx import flags, models
from tx.attention.deberta import Deberta
from tx.flags import model_config
from tx.kernels import row_tables

TINY = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=16)


def _with_impl(cfg, impl):
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention,
                                                                  implementation=(impl,)))


def test_flags_spell_and_refuse():
    cfg = model_config(task="mlm", positions="deberta", deberta_buckets=4,
                       deberta_max_relative=8, deberta_terms=("p2c", "c2p"), **TINY)
    assert cfg.positions == Deberta(4, 8, ("c2p", "p2c"))  # one spelling, DeBERTa's order
    printed = flags.to_flags(cfg)
    assert printed["positions"] == "deberta" and printed["deberta_buckets"] == 4
    assert model_config(**printed) == cfg
    assert model_config(**flags.to_flags(model_config(
        task="mlm", positions="deberta", deberta_terms=("c2p",), **TINY))).positions.terms == \
        ("c2p",)
    with pytest.raises(ValueError, match="deberta_terms"):
        model_config(task="mlm", positions="deberta", deberta_terms=("p2p",), **TINY)
    with pytest.raises(ValueError, match="position_buckets"):
        Deberta(2, 8)
    with pytest.raises(ValueError, match="max_relative_positions"):
        Deberta(4, 1)


def test_training_step_through_the_kernels_reaches_relative_embeddings():
    """The flash kernels' loss equals the xla path's; every gradient is finite and the shared
    relative embeddings get one (gradient values are checked per kernel in
    tests/kernels/test_disentangled.py)."""
    cfg = model_config(task="mlm", positions="deberta", deberta_buckets=4,
                       deberta_max_relative=8, **{**TINY, "num_layers": 1})
    rng = np.random.RandomState(1)
    batch = {"inputs": jnp.asarray(rng.randint(1, 61, (2, 12)), jnp.int32),
             "targets": jnp.asarray(rng.randint(1, 61, (2, 12)), jnp.int32),
             "weights": jnp.asarray(rng.rand(2, 12) < 0.5, jnp.float32),
             "lengths": jnp.asarray([12, 7], jnp.int32)}
    losses, grads = {}, None
    for impl in ("xla", "pallas"):
        c = _with_impl(cfg, impl)
        graph, params, rest = nnx.split(models.build(c, seed=0), nnx.Param, ...)

        def loss(p, c=c, graph=graph, rest=rest):
            return c.head.loss(nnx.merge(graph, p, rest), batch)[0]
        if impl == "xla":
            losses[impl] = jax.jit(loss)(params)
        else:
            losses[impl], grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(losses["xla"]))
    assert abs(float(losses["xla"]) - float(losses["pallas"])) < 1e-5
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    rel = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
           if "rel_rd" in jax.tree_util.keystr(path)]
    assert len(rel) == 1 and np.abs(np.asarray(rel[0])).max() > 0


def test_a_decoding_cache_is_refused_by_name():
    cfg = model_config(task="mlm", positions="deberta", deberta_buckets=4,
                       deberta_max_relative=8, **TINY)
    model = models.build(cfg, seed=0)
    model.encoder.tower.init_cache(1, 8)
    with pytest.raises(ValueError, match="positions=deberta: a decoding cache"):
        model(jnp.ones((1, 4), jnp.int32))


def test_a_linear_attention_layer_refuses_deberta_positions_by_name():
    cfg = model_config(task="mlm", positions="deberta", layer_pattern="favor,full", **TINY)
    with pytest.raises(ValueError, match="positions=DisentangledPositions"):
        models.build(cfg, seed=0)


# --- Hugging Face -------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
torch.set_num_threads(1)  # the CPU is shared with JAX and pytest-xdist workers

from tests.tx.hf_util import TOL, hf_model, padded_batch, save  # noqa: E402
from tx.interop import hf  # noqa: E402

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, relative_attention=True,
            position_biased_input=False, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", share_att_key=True, position_buckets=4,
            max_relative_positions=8, type_vocab_size=0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
VARIANTS = {  # name: (config overrides, implementations checked)
    # v3-shaped; distances past max_relative_positions - 1 hit the bucket edge.
    "v3": ({}, ("xla", "pallas")),
    "c2p_new_head_token_types": (dict(legacy=False, pos_att_type=["c2p"], type_vocab_size=2,
                                      hidden_act="gelu_new"), ("xla",)),
    "p2c_no_buckets": (dict(position_buckets=-1, max_relative_positions=6,
                            pos_att_type="p2c"), ("xla",)),
}


def test_log_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
    rel = np.arange(-1100, 1101)
    # (4, 8) and (256, 512) hold the distance max_position - 1, where HF's fp32 formula lands
    # exactly on an integer.
    for buckets, max_rel in [(4, 8), (8, 20), (6, 30), (256, 512), (64, 512), (16, 17)]:
        want = make_log_bucket_position(torch.tensor(rel), buckets, max_rel).long().numpy()
        want = np.clip(want + buckets, 0, 2 * buckets - 1)
        got = jax.jit(lambda r, b=buckets, m=max_rel: row_tables.relative_index(
            r, jnp.int32(0), position_buckets=b, max_relative_positions=m))(
                jnp.asarray(rel, jnp.int32))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str((buckets, max_rel)))


_PAIRS = {}


def _pair(name, tmp_path_factory):
    """The HF model of variant ``name`` and its saved directory, built once per module."""
    if name not in _PAIRS:
        extra, impls = VARIANTS[name]
        ref = hf_model(transformers, torch, "DebertaV2ForMaskedLM", "DebertaV2Config",
                       spread=0.2, **{**BASE, **extra})
        _PAIRS[name] = name, ref, save(tmp_path_factory, name, ref), impls
    return _PAIRS[name]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


def _hf_logits(ref, ids, valid):
    with torch.no_grad():
        return ref(torch.tensor(ids),
                   attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()


def test_masked_lm_logits_match_on_padded_batch(pair):
    name, ref, path, impls = pair
    ids, valid, lengths = padded_batch(VOCAB)
    want = _hf_logits(ref, ids, valid)
    for impl in impls:
        model = hf.load(path, implementation=(impl,))
        got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
        assert got.shape == want.shape
        assert np.abs(got - want)[valid].max() <= TOL, (name, impl)


def test_saved_files_load_into_transformers(tmp_path_factory, tmp_path):
    """One round trip (the v3 shape) covers the mapping's inverse."""
    name, ref, path, _ = _pair("v3", tmp_path_factory)
    model = hf.load(path)
    assert hf.model_type_of(model.config) == "deberta-v2"
    hf.save(model, tmp_path)
    back = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path).eval()
    ids, valid, _ = padded_batch(VOCAB)
    np.testing.assert_allclose(_hf_logits(back, ids, valid)[valid],
                               _hf_logits(ref, ids, valid)[valid], atol=1e-5)


@pytest.mark.parametrize("option,value", [
    ("relative_attention", False), ("position_biased_input", True),
    ("pos_att_type", ["p2p", "c2p"]), ("norm_rel_ebd", "none"), ("share_att_key", False),
    ("conv_kernel_size", 3), ("embedding_size", 16), ("attention_head_size", 4),
    ("architectures", ["DebertaV2ForSequenceClassification"])])
def test_unsupported_options_are_refused_by_name(option, value):
    cfg = dict(BASE, model_type="deberta-v2", architectures=["DebertaV2ForMaskedLM"])
    cfg[option] = value
    with pytest.raises(ValueError, match=f"unsupported Hugging Face config option {option}="):
        hf.config_from_hf(cfg)
