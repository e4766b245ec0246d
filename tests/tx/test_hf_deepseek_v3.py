"""DeepSeek-V3 (every layer dense) <-> tx: multi-head latent attention (``tx.attention.mla``).

Two tiny random fp32 ``transformers`` models (2 layers, 4 heads, d_model 32, v head dim apart
from the q/k one): ``plain`` (no q compression, DeepSeek's interleaved RoPE, untied) and
``qlora_yarn`` (q compression, ``rope_interleave: false``, YaRN with ``mscale_all_dim``, tied
embeddings). Each is saved with ``save_pretrained``, loaded with ``hf.load`` and compared on
logits over a padded batch (max abs diff <= 1e-4) and on greedy generation against
``transformers.generate`` from the contiguous and the paged latent caches; weights and
configs map back; routed experts and options tx would compute differently fail by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.tx.hf_util import TOL, hf_greedy, hf_logits, hf_model, padded_logit_diff
from tx.attention.mla import MLA
from tx.flags import ModelFlags, parse, to_flags
from tx.inference import Contiguous, Paged, generate
from tx.interop import hf
from tx.interop.hf import deepseek_v3

try:
    import torch
    import transformers
    torch.set_num_threads(1)
except ImportError:
    torch = transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs torch and transformers")

VOCAB, PAD, EOS, NEW = 64, 0, 2, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
              first_k_dense_replace=2, n_routed_experts=4, n_group=1, topk_group=1,
              num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
# Weights N(0, spread): tied embeddings need the wider draw for a greedy continuation that is
# not one repeated token.
SPREAD = {"plain": 0.15, "qlora_yarn": 0.3}
VARIANTS = {
    "plain": dict(COMMON, q_lora_rank=None, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="default", rope_theta=300.0)),
    "qlora_yarn": dict(COMMON, q_lora_rank=24, tie_word_embeddings=True, rope_interleave=False,
                       rope_parameters=dict(rope_type="yarn", rope_theta=300.0, factor=4.0,
                                            mscale=1.0, mscale_all_dim=0.7, beta_fast=8.0,
                                            beta_slow=1.0,
                                            original_max_position_embeddings=16)),
}


def _hf_logits(ref, ids, valid):
    return hf_logits(torch, ref, ids, valid)


def _max_diff(model, ref, seed=0) -> float:
    return padded_logit_diff(torch, model, ref, VOCAB, seed)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, HF model, checkpoint path, tx model, (prompt, HF's greedy tokens))."""
    if transformers is None:
        pytest.skip("needs torch and transformers")
    ref = hf_model(transformers, torch, "DeepseekV3ForCausalLM", "DeepseekV3Config",
                   spread=SPREAD[request.param], attn_implementation="eager",
                   **VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    prompt = np.random.RandomState(1).randint(3, VOCAB, (2, 7))
    want = hf_greedy(torch, ref, prompt, new=NEW, eos=EOS, pad=PAD)
    return request.param, ref, str(path), hf.load(path), (prompt, want)


@needs_hf
def test_logits_match_and_map_back(variant):
    name, ref, path, model, _ = variant
    diff = _max_diff(model, ref)
    print(f"{name}: max |dlogit| {diff:.2e}")
    assert diff <= TOL, f"{name}: max abs logit diff {diff}"
    cfg = model.config
    hf_cfg = json.loads(Path(path, "config.json").read_text())
    assert cfg.attention.masks == (MLA(16, 8, 8, 12, VARIANTS[name]["q_lora_rank"]),)
    assert hf.model_type_of(cfg) == "deepseek_v3"
    assert parse(ModelFlags(**to_flags(cfg))) == cfg
    back = hf.config_from_hf(hf.hf_config_from(cfg))
    if cfg.attention.scale is None:
        assert back == cfg
    else:  # YaRN's gain goes through mscale_all_dim and back: equal to rounding
        assert back.attention.scale == pytest.approx(cfg.attention.scale, rel=1e-12)
    # save writes DeepSeek's interleaved RoPE layout: a rope_interleave=false checkpoint is
    # compared in that layout (the load path's own conversion, checked by the logits above).
    ours = hf.state_dict(model)
    theirs = deepseek_v3.canonical_tensors(hf_cfg, {
        k: v.numpy() for k, v in ref.state_dict().items()
        if not (cfg.head.tie and k == "lm_head.weight")})
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


@needs_hf
def test_rope_layout_and_yarn_gain_matter(variant):
    """Parity is not vacuous: the other RoPE layout, or no YaRN logits gain, change logits."""
    _, ref, path, model, _ = variant
    hf_cfg = json.loads(Path(path, "config.json").read_text())
    raw = hf.read_safetensors(path)
    other = hf.load(path)
    hf.load_weights(other, deepseek_v3.canonical_tensors(
        {**hf_cfg, "rope_interleave": not hf_cfg["rope_interleave"]}, raw))
    assert _max_diff(other, ref) > 1e-2
    if model.config.attention.scale is not None:
        other = hf.load(path)
        for attn in other.tower.self_attentions():  # NNX attribute assignment
            attn.scale = (8 + 8) ** -0.5  # DeepSeek's scale without YaRN's gain
        assert _max_diff(other, ref) > 1e-3


@needs_hf
@pytest.mark.parametrize("cache", [Contiguous(), Paged(4)], ids=["contiguous", "paged"])
def test_greedy_generation_matches(variant, cache):
    _, _, _, model, (prompt, want) = variant
    assert len(set(want.ravel())) > 3, "HF's continuation is degenerate"
    got = generate(model, prompt, max_new_tokens=NEW, stop_tokens=(EOS,), cache=cache)
    np.testing.assert_array_equal(got.tokens, want)


@needs_hf
def test_save_loads_in_transformers_with_the_same_logits(variant, tmp_path):
    name, ref, _, model, _ = variant
    hf.save(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v3" and saved["first_k_dense_replace"] == 2
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(again) is type(ref)
    ids = np.random.RandomState(6).randint(3, VOCAB, (2, 9))
    ones = np.ones_like(ids, bool)
    # Not bit-equal where the layout or the YaRN gain was rewritten: another rounding order.
    diff = np.abs(_hf_logits(again, ids, ones) - _hf_logits(ref, ids, ones)).max()
    assert diff <= 1e-5, f"{name}: saved model's logits differ by {diff}"


@needs_hf
def test_multi_token_prediction_modules_are_dropped(variant):
    """DeepSeek's checkpoints carry an MTP module as one more layer; transformers' causal LM
    does not run it, and neither does tx."""
    _, _, _, model, _ = variant
    tensors = hf.state_dict(model)
    mtp = {f"model.layers.2.{k}": np.zeros(3, np.float32)
           for k in ("eh_proj.weight", "enorm.weight", "self_attn.kv_b_proj.weight")}
    hf.load_weights(model, {**tensors, **mtp})  # no "no place in the tx model" error
    with pytest.raises(ValueError, match="no place"):
        hf.load_weights(model, {**tensors, "model.layers.2.enorm.weight": np.zeros(3)})


# -- options tx cannot reproduce fail by name ------------------------------------------------------
@pytest.mark.parametrize("change, option", [
    (dict(first_k_dense_replace=1, n_routed_experts=8), "first_k_dense_replace"),
    (dict(first_k_dense_replace=None, n_routed_experts=8), None),  # None: every layer dense
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
    (dict(architectures=["DeepseekV3ForSequenceClassification"]), "architectures"),
    (dict(quantization_config=dict(quant_method="fp8", weight_block_size=[128, 128])),
     "quantization_config='fp8'"),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)),
     r"rope_parameters\.rope_type"),
])
def test_unsupported_hf_option_raises_naming_it(change, option):
    config = {**VARIANTS["plain"], "model_type": "deepseek_v3", **change}
    if option is None:
        assert hf.config_from_hf(config).num_layers == 2
        return
    with pytest.raises(ValueError, match=option):
        hf.config_from_hf(config)


def test_routed_experts_refusal_names_the_layers_and_the_fix():
    config = {**VARIANTS["plain"], "model_type": "deepseek_v3", "num_hidden_layers": 61,
              "first_k_dense_replace": 3, "n_routed_experts": 256}
    with pytest.raises(ValueError, match=r"first_k_dense_replace=3.*layers 3\.\.60.*"
                       r"n_routed_experts=256.*mixture-of-experts"):
        hf.config_from_hf(config)


def test_a_flags_built_mla_decoder_saves_as_deepseek_v3_and_what_it_cannot_hold_fails():
    from tx.flags import model_config
    mla = dict(activation="swiglu", norm="rmsnorm", positions="rope", attention="mla",
               mla_kv_rank=16, mla_rope_dim=8, mla_nope_dim=8, mla_v_dim=12, d_model=32,
               num_heads=4, norm_eps=1e-6)
    cfg = model_config(**mla)
    assert hf.model_type_of(cfg) == "deepseek_v3"
    assert hf.hf_config_from(cfg)["first_k_dense_replace"] == cfg.num_layers
    with pytest.raises(ValueError, match="attention.scale"):  # no YaRN: the scale is fixed
        hf.model_type_of(model_config(**mla, attention_scale=0.5))
    with pytest.raises(ValueError, match="norm.eps"):
        hf.model_type_of(model_config(**{**mla, "norm_eps": 1e-5}))
    with pytest.raises(ValueError, match="no supported Hugging Face equivalent"):
        hybrid = {k: v for k, v in mla.items() if k != "attention"}
        hf.model_type_of(model_config(**hybrid, layer_pattern="mla,full"))
