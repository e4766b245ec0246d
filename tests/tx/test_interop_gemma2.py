"""Gemma 2 <-> tx, and the model options it brought (sandwich and unit-offset norms, scaled
embeddings, soft-capped attention and vocabulary logits).

A tiny random fp32 ``transformers`` Gemma 2 (4 layers alternating a 6-key window and global
attention, GQA 4:2, head_dim 16 != d_model / heads, attention cap 5, final cap 3: small enough
to bind) is saved with ``save_pretrained``, loaded into tx and compared on logits over a padded
batch longer than the window (max abs diff <= 1e-4) and on greedy generation against
``transformers.generate`` token for token, with the contiguous and the paged KV cache; tx ->
HF files -> ``from_pretrained`` round trips; unsupported options fail by name. The unit tests of
the new options need neither torch nor transformers.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx.kernels import masks, score_mods
from tests.tx.hf_util import TOL, hf_greedy, hf_model, padded_batch
from tx import models
from tx.config import EmbedConfig
from tx.flags import ModelFlags, model_config
from tx.inference import Contiguous, Paged, generate
from tx.interop import hf
from tx.layers import LayerNorm, RMSNorm
from tx.layers.block import Block
from tx.models.heads import LMHead

try:
    import torch
    import transformers
    torch.set_num_threads(1)  # the CPU is shared with JAX and pytest-xdist workers
except ImportError:  # the unit tests below still run
    torch = transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs torch and transformers")

VOCAB, PAD, EOS, WINDOW = 64, 0, 2, 6
HF_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=12,
    rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS,
    pad_token_id=PAD, rope_parameters=dict(rope_type="default", rope_theta=500.0))
NEW = 10  # generated tokens after a prompt of 8: both run past the window of 6


def _hf_logits(ref, ids, valid):
    with torch.no_grad():
        return ref(torch.tensor(ids), attention_mask=torch.tensor(
            valid.astype(np.int64))).logits.numpy()


def _max_diff(model, ref, seed=0) -> float:
    """Max abs logit difference over the valid positions of a right-padded batch."""
    ids, valid, lengths = padded_batch(VOCAB, seed, t=14, lengths=(14, 9, 3))
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    want = _hf_logits(ref, ids, valid)
    assert got.shape == want.shape
    return float(np.abs(got - want)[valid].max())


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(HF model, its checkpoint path, tx model loaded from it, (prompt, HF's greedy tokens))."""
    if transformers is None:
        pytest.skip("needs torch and transformers")
    # Weights N(0, 0.15), norm weights 1 + N(0, 0.1) (Gemma's gain 1 + w: about 2): HF's tiny
    # init would predict one token everywhere and leave the caps idle. Row 0 stops early.
    ref = hf_model(transformers, torch, "Gemma2ForCausalLM", "Gemma2Config", spread=0.15,
                   attn_implementation="eager", **HF_CONFIG)
    path = tmp_path_factory.mktemp("gemma2")
    ref.save_pretrained(path)
    prompt = np.random.RandomState(1).randint(3, VOCAB, (2, 8))
    want = hf_greedy(torch, ref, prompt, new=NEW, eos=EOS, pad=PAD)
    return ref, str(path), hf.load(path), (prompt, want)


# -- HF checkpoints -> tx ------------------------------------------------------------------------
@needs_hf
def test_config_maps_every_gemma_option(gemma):
    _, _, model, _ = gemma
    cfg = model.config
    # transformers' default layer_types: sliding first, alternating; kept as its period.
    assert cfg.attention.masks == (masks.Local(WINDOW - 1), masks.Causal())
    assert [b.self_attn.mask for b in model.tower.blocks] == \
        [masks.Local(WINDOW - 1), masks.Causal()] * 2
    assert (cfg.kv_heads, cfg.head_dim, cfg.attention.scale) == (2, 16, 12 ** -0.5)
    assert cfg.attention.score_mod == score_mods.SoftCap(5.0)
    assert cfg.head == LMHead(tie=True, softcap=3.0)
    assert cfg.norm == RMSNorm(1e-5, pre=True, sandwich=True, unit_offset=True)
    assert cfg.embed == EmbedConfig(scale=32 ** 0.5)
    assert (cfg.mlp.activation, cfg.mlp.gated, cfg.mlp.d_ff) == (jax.nn.gelu, True, 64)


@needs_hf
def test_logits_match_on_padded_batch(gemma):
    ref, _, model, _ = gemma
    diff = _max_diff(model, ref)
    assert diff <= TOL, f"max abs logit diff {diff}"


@needs_hf
@pytest.mark.parametrize("change", [
    dict(attention_softcap=None), dict(final_softcap=None), dict(attention_softcap=10.0),
    dict(window=14), dict(window=WINDOW + 1), dict(window=WINDOW - 1),
    dict(layer_pattern=("causal", "local"))])
def test_each_option_matters(gemma, change):
    """Parity is not vacuous: another cap (or none), a window one key longer or shorter than
    HF's (or longer than the batch), or the other layers sliding: other logits."""
    ref, path, _, _ = gemma
    assert _max_diff(hf.load(path, **change), ref) > 1e-2, change


@needs_hf
@pytest.mark.parametrize("cache", [Contiguous(), Paged(4)], ids=["contiguous", "paged"])
def test_greedy_generation_matches(gemma, cache):
    _, _, model, (prompt, want) = gemma
    assert len(set(want.ravel())) > 4, "HF's continuation is degenerate"
    got = generate(model, prompt, max_new_tokens=NEW, stop_tokens=(EOS,), cache=cache)
    np.testing.assert_array_equal(got.tokens, want)


@needs_hf
def test_config_and_weights_map_back_exactly(gemma):
    ref, _, model, _ = gemma
    assert hf.model_type_of(model.config) == "gemma2"
    assert hf.config_from_hf(hf.hf_config_from(model.config)) == model.config
    ours = hf.state_dict(model)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(theirs)  # the tied lm_head is left out
    for key, value in ours.items():  # norm weights too: Gemma's parameterisation, unconverted
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


@needs_hf
def test_save_loads_in_transformers_with_the_same_logits(gemma, tmp_path):
    ref, _, model, _ = gemma
    hf.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma2"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is transformers.Gemma2ForCausalLM
    assert again.config.layer_types == ref.config.layer_types
    ids = np.random.RandomState(6).randint(3, VOCAB, (2, 9))
    ones = np.ones_like(ids, bool)
    np.testing.assert_array_equal(_hf_logits(again, ids, ones), _hf_logits(ref, ids, ones))


# -- tx -> HF files -> transformers ----------------------------------------------------------------
GEMMA_FLAGS = dict(
    vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=12,
    d_ff=48, activation="geglu", norm="rmsnorm", positions="rope", max_len=64, rope_base=800.0,
    sandwich_norm=True, norm_unit_offset=True, embed_scale=32 ** 0.5, attention_softcap=4.0,
    final_softcap=None, tie_embeddings=False, attention_bias=True,
    layer_pattern=("causal", "local"), window=3)


@needs_hf
def test_tx_built_model_round_trips_through_transformers(tmp_path):
    """An untied, biased, MQA tx model with full attention first, no final cap and the default
    scale, with non-trivial norm gains, saved for HF and read back."""
    model = models.build(model_config(**GEMMA_FLAGS), seed=3)
    rng = np.random.RandomState(4)
    tensors = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) if
               k.endswith(("norm.weight", "bias")) else v for k, v in hf.state_dict(model).items()}
    hf.load_weights(model, tensors)
    hf.save(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    assert (written["sliding_window"], written["query_pre_attn_scalar"],
            written["final_logit_softcapping"]) == (3, 12, None)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _max_diff(model, ref, seed=5) <= TOL
    ref.save_pretrained(tmp_path / "again")  # and back: HF's own files load unchanged
    assert hf.load(tmp_path / "again").config == model.config


# -- options tx cannot reproduce fail by name ------------------------------------------------------
@pytest.mark.parametrize("change, option", [
    (dict(hidden_activation="gelu"), "hidden_activation"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "layer_types"),
    (dict(layer_types=["full_attention"] * 3), "layer_types"),  # one entry per layer
    (dict(sliding_window=None), "sliding_window"),  # sliding layers need a window
    (dict(architectures=["Gemma2ForSequenceClassification"]), "architectures"),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, factor=2.0)),
     "rope_parameters.rope_type"),
])
def test_unsupported_hf_option_raises_naming_it(change, option):
    config = {**HF_CONFIG, "model_type": "gemma2", **change}
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        hf.config_from_hf(config)


@pytest.mark.parametrize("change, field", [
    (dict(layer_pattern=("local", "strided")), "attention.masks"),
    (dict(attention_scale=0.3), "attention.scale"),  # 0.3 ** -2 is no integer
    (dict(positions="alibi"), "positions"),
    (dict(activation="swiglu"), "mlp"),
    (dict(embed_scale=2.0), "embed"),
    (dict(head_scale=0.5), "head"),
    (dict(attention_out_bias=False), "attention.out_bias"),
])
def test_gemma_shaped_config_that_gemma_cannot_hold_fails_by_field(change, field):
    cfg = model_config(**{**GEMMA_FLAGS, **change})
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        hf.hf_config_from(cfg)


def test_other_families_refuse_gemma_options():
    """A LLaMA body with one Gemma option would lose it as LLaMA: no family takes it."""
    llama = dict(activation="swiglu", norm="rmsnorm", positions="rope", attention="causal")
    for option in (dict(final_softcap=30.0), dict(attention_softcap=50.0),
                   dict(embed_scale=2.0), dict(sandwich_norm=True),
                   dict(norm_unit_offset=True)):
        with pytest.raises(ValueError, match="no supported Hugging Face equivalent"):
            hf.model_type_of(model_config(**llama, **option))
    assert hf.model_type_of(model_config(**llama)) == "llama"


# -- the new model options, unit by unit -----------------------------------------------------------
def test_unit_offset_rmsnorm_scales_by_one_plus_w_in_fp32():
    norm = RMSNorm(1e-5, unit_offset=True).build(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.zeros(8))  # gain 1 at init
    w = np.linspace(-0.5, 0.5, 8).astype(np.float32)
    norm.scale.set_value(jnp.asarray(w))
    x = np.random.RandomState(0).standard_normal((2, 3, 8)).astype(np.float32) * 3
    x16 = jnp.asarray(x, jnp.bfloat16)
    got = norm(x16)
    assert got.dtype == jnp.bfloat16
    x32 = np.asarray(x16, np.float32)  # Gemma: normalise and scale in fp32, then cast
    want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-5) * (1 + w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.bfloat16)))


class _Double(nnx.Module):
    def __call__(self, x, *args, **kwargs):
        return 2.0 * x


def test_sandwich_block_normalises_each_sub_layer_output():
    d, rngs = 8, nnx.Rngs(0)
    block = Block(_Double(), _Double(), d_model=d, norm=RMSNorm(1e-6, sandwich=True), rngs=rngs)
    gains = [np.full(d, g, np.float32) for g in (1.0, 2.0, 3.0, 4.0)]
    for norm, g in zip([*block.norms, *block.out_norms], gains):
        norm.scale.set_value(jnp.asarray(g))
    x = np.random.RandomState(0).standard_normal((1, 3, d)).astype(np.float32)

    def rms(v, g):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6) * g
    h = x + rms(2 * rms(x, gains[0]), gains[2])  # x + out_norm(attn(norm(x)))
    want = h + rms(2 * rms(h, gains[1]), gains[3])
    np.testing.assert_allclose(np.asarray(block(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_pre_and_post_norm_blocks_keep_their_parameter_names():
    """Checkpoints of existing models must still load: no new state unless sandwich."""
    for norm in (RMSNorm(), LayerNorm(pre=False)):
        block = Block(_Double(), _Double(), d_model=4, norm=norm, rngs=nnx.Rngs(0))
        paths = {p[0] for p, node in nnx.iter_graph(block) if isinstance(node, nnx.Param)}
        assert paths == {"norms"} and block.out_norms is None


def _small(**flags):
    return model_config(num_layers=1, vocab_size=16, d_model=8, num_heads=2, d_ff=8, **flags)


def test_embed_scale_multiplies_the_token_vectors():
    ids = jnp.asarray([[1, 2, 3, 9]])
    scaled = models.build(_small(embed_scale=8 ** 0.5, tie_embeddings=False), seed=0)
    # The same weights with the scale folded into the (untied) input table: the same logits.
    folded = models.build(_small(tie_embeddings=False), seed=0)
    table = folded.tower.embed.table_vd
    table.set_value(table[...] * jnp.float32(math.sqrt(8)))
    np.testing.assert_array_equal(np.asarray(scaled(ids)), np.asarray(folded(ids)))
    # A tied head reads the unscaled table (Gemma's lm_head is the bare embedding matrix).
    tied, plain = models.build(_small(embed_scale=4.0)), models.build(_small())
    h = jnp.ones((1, 1, 8))
    np.testing.assert_array_equal(np.asarray(tied.head(h)), np.asarray(plain.head(h)))
    assert np.abs(np.asarray(tied(ids)) - np.asarray(plain(ids))).max() > 1e-3


def test_final_softcap_bounds_the_logits():
    h = jnp.asarray(np.random.RandomState(0).standard_normal((1, 2, 8)), jnp.float32)
    raw = np.asarray(models.build(_small()).head(h))
    got = np.asarray(models.build(_small(final_softcap=2.0)).head(h))
    assert np.abs(raw).max() > 3 and np.abs(got).max() < 2
    np.testing.assert_allclose(got, 2 * np.tanh(raw / 2), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("build, field", [
    (lambda: RMSNorm(pre=False, sandwich=True), "norm.sandwich"),
    (lambda: EmbedConfig(scale=0.0), "embed.scale"),
    (lambda: EmbedConfig(scale=float("inf")), "embed.scale"),
    (lambda: LMHead(softcap=0.0), "head.softcap"),
    (lambda: LMHead(softcap=float("nan")), "head.softcap"),
    (lambda: ModelFlags(sandwich_norm=True, pre_norm=False), "sandwich_norm"),
    (lambda: ModelFlags(norm="layernorm", norm_unit_offset=True), "norm_unit_offset"),
    (lambda: ModelFlags(attention_softcap=-1.0), "attention_softcap"),
    (lambda: ModelFlags(final_softcap=0), "final_softcap"),
    (lambda: ModelFlags(embed_scale=0.0), "embed_scale"),
])
def test_bad_values_name_their_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
