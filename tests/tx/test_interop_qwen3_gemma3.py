"""Qwen3 and Gemma 3 (text) <-> tx, and the options they brought: per-head q/k norms
(``AttentionConfig(qk_norm=True)``) and a RoPE per layer kind (``LayerRoPE``).

Tiny random fp32 ``transformers`` models (2 layers for Qwen3; 3 for Gemma 3, sliding, sliding,
global, each kind with its own RoPE base) are saved with ``save_pretrained``, loaded into tx and
compared on logits over a padded batch (max abs diff <= 1e-4) and on greedy generation against
``transformers.generate`` with the contiguous and the paged caches; configs and weights map back
exactly; options tx cannot reproduce fail by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tx.hf_util import TOL, hf_greedy, hf_logits, hf_model, padded_logit_diff
from tx import models
from tx.flags import ModelFlags, model_config, parse, to_flags
from tx.inference import Contiguous, Paged, generate
from tx.interop import hf
from tx.kernels import masks
from tx.layers import RoPE
from tx.layers.positions import LayerRoPE

try:
    import torch
    import transformers
    torch.set_num_threads(1)
except ImportError:
    torch = transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs torch and transformers")

VOCAB, PAD, EOS, NEW = 64, 0, 2, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        COMMON, num_hidden_layers=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=300.0))),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        COMMON, num_hidden_layers=3, sliding_window=5, sliding_window_pattern=3,
        query_pre_attn_scalar=12, final_logit_softcapping=4.0,
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=3000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=20.0)})),
}


def _hf_logits(ref, ids, valid):
    return hf_logits(torch, ref, ids, valid)


def _max_diff(model, ref, seed=0) -> float:
    return padded_logit_diff(torch, model, ref, VOCAB, seed)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, HF model, checkpoint path, tx model, (prompt, HF's greedy tokens))."""
    if transformers is None:
        pytest.skip("needs torch and transformers")
    cls, config_cls, config = FAMILIES[request.param]
    ref = hf_model(transformers, torch, cls, config_cls, spread=0.15,
                   attn_implementation="eager", **config)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    prompt = np.random.RandomState(1).randint(3, VOCAB, (2, 7))
    want = hf_greedy(torch, ref, prompt, new=NEW, eos=EOS, pad=PAD)
    return request.param, ref, str(path), hf.load(path), (prompt, want)


@needs_hf
def test_logits_match_and_map_back(family):
    name, ref, _, model, _ = family
    diff = _max_diff(model, ref)
    print(f"{name}: max |dlogit| {diff:.2e}")
    assert diff <= TOL, f"{name}: max abs logit diff {diff}"
    cfg = model.config
    assert cfg.attention.qk_norm and hf.model_type_of(cfg) == name
    assert hf.config_from_hf(hf.hf_config_from(cfg)) == cfg
    assert parse(ModelFlags(**to_flags(cfg))) == cfg  # --print_config and init.hf spell it
    ours = hf.state_dict(model)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()
              if not (cfg.head.tie and k == "lm_head.weight")}
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


@needs_hf
def test_q_k_norms_and_layer_bases_matter(family):
    """Parity is not vacuous: without the q/k norms, or with one RoPE base, other logits."""
    name, ref, path, model, _ = family
    cfg = model.config
    off = hf.load(path)
    for attn in off.tower.self_attentions():  # NNX attribute assignment: the norms gone
        attn.q_norm = attn.k_norm = None
    assert _max_diff(off, ref) > 1e-2
    if name == "gemma3_text":
        assert cfg.positions == LayerRoPE((RoPE(20.0, None, 64), RoPE(20.0, None, 64),
                                           RoPE(3000.0, None, 64)))
        assert cfg.attention.masks == (masks.Local(4), masks.Local(4), masks.Causal())
        one_base = hf.load(path)
        attns = one_base.tower.self_attentions()
        for attn in attns:  # every layer turns at the global base
            attn.positions = attns[-1].positions
        assert _max_diff(one_base, ref) > 1e-2


@needs_hf
@pytest.mark.parametrize("cache", [Contiguous(), Paged(16)], ids=["contiguous", "paged"])
def test_greedy_generation_matches(family, cache):
    _, _, _, model, (prompt, want) = family
    assert len(set(want.ravel())) > 3, "HF's continuation is degenerate"
    got = generate(model, prompt, max_new_tokens=NEW, stop_tokens=(EOS,), cache=cache)
    np.testing.assert_array_equal(got.tokens, want)


@needs_hf
def test_save_loads_in_transformers_with_the_same_logits(family, tmp_path):
    name, ref, _, model, _ = family
    hf.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == name
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(again) is type(ref)
    ids = np.random.RandomState(6).randint(3, VOCAB, (2, 9))
    ones = np.ones_like(ids, bool)
    np.testing.assert_array_equal(_hf_logits(again, ids, ones), _hf_logits(ref, ids, ones))


# -- options tx cannot reproduce fail by name ------------------------------------------------------
@pytest.mark.parametrize("name, change, option", [
    ("gemma3_text", dict(rope_parameters={"full_attention": dict(
        rope_type="yarn", rope_theta=1e6, factor=8.0), "sliding_attention": dict(
        rope_type="default", rope_theta=1e4)}), "rope_parameters.full_attention.rope_type"),
    ("gemma3_text", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
     "rope_parameters.full_attention.rope_type"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("gemma3_text", dict(hidden_activation="relu"), "hidden_activation"),
    ("qwen3", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen3", dict(layer_types=["sliding_attention", "full_attention"]), "use_sliding_window"),
])
def test_unsupported_hf_option_raises_naming_it(name, change, option):
    config = {**FAMILIES[name][2], "model_type": name, **change}
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        hf.config_from_hf(config)


def test_qk_norm_is_a_flag_and_only_qwen3_or_gemma3_save_it():
    llama = dict(activation="swiglu", norm="rmsnorm", positions="rope", attention="causal")
    cfg = model_config(**llama, attention_qk_norm=True)
    assert cfg.attention.qk_norm and parse(ModelFlags(**to_flags(cfg))) == cfg
    assert hf.model_type_of(cfg) == "qwen3"
    assert hf.model_type_of(model_config(**llama)) == "llama"
    with pytest.raises(ValueError, match="no supported Hugging Face equivalent"):
        hf.model_type_of(model_config(**llama, attention_qk_norm=True, attention_softcap=5.0))
    gemma = dict(activation="geglu", norm="rmsnorm", positions="rope", sandwich_norm=True,
                 norm_unit_offset=True, embed_scale=64 ** 0.5)
    assert hf.model_type_of(model_config(**gemma)) == "gemma2"
    assert hf.model_type_of(model_config(**gemma, attention_qk_norm=True)) == "gemma3_text"
    with pytest.raises(ValueError, match="attention.score_mod"):
        hf.model_type_of(model_config(**gemma, attention_qk_norm=True, attention_softcap=5.0))


def test_layer_rope_gives_each_layer_its_base():
    from dataclasses import replace
    cfg = model_config(num_layers=3, attention_qk_norm=True, norm="rmsnorm")
    cfg = replace(cfg, positions=LayerRoPE((RoPE(10.0), RoPE(1e4))))
    model = models.build(cfg, seed=0)
    attns = model.tower.self_attentions()
    assert [a.positions.base for a in attns] == [10.0, 1e4, 10.0]
    assert attns[0].q_norm.scale[...].shape == (cfg.head_dim,)
    with pytest.raises(ValueError, match="positions.schedule"):
        LayerRoPE((RoPE(), "rope"))
    with pytest.raises(ValueError, match="attention.qk_norm"):
        replace(cfg.attention, qk_norm="rms")


@needs_hf
def test_gemma3_linear_rope_scaling_of_global_layers_matches(tmp_path):
    """Gemma 3 checkpoints scale the global layers' RoPE linearly; the sliding ones not."""
    cls, config_cls, config = FAMILIES["gemma3_text"]
    config = dict(config, num_hidden_layers=2, sliding_window_pattern=2, rope_parameters={
        "full_attention": dict(rope_type="linear", rope_theta=3000.0, factor=4.0),
        "sliding_attention": dict(rope_type="default", rope_theta=20.0)})
    ref = hf_model(transformers, torch, cls, config_cls, spread=0.15,
                   attn_implementation="eager", **config)
    ref.save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    assert model.config.positions.schedule[1].scaling.kind == "linear"
    assert _max_diff(model, ref) <= TOL
    assert hf.config_from_hf(hf.hf_config_from(model.config)) == model.config


def test_layer_rope_prints_back_to_flags():
    """Gemma 3's per-layer RoPE has a flag spelling, so --print_config and init.hf take it."""
    from dataclasses import replace
    from tx.layers import RopeScaling
    cfg = model_config(num_layers=3, positions="layer_rope", rope_bases=(20.0, 3000.0),
                       max_len=64)
    assert cfg.positions == LayerRoPE((RoPE(20.0, None, 64), RoPE(3000.0, None, 64)))
    assert parse(ModelFlags(**to_flags(cfg))) == cfg
    scaled = replace(cfg, positions=LayerRoPE((RoPE(20.0, None, 64),
                                               RoPE(3000.0, RopeScaling("linear", 8.0), 64))))
    assert parse(ModelFlags(**to_flags(scaled))) == scaled
    for bad, field in ((dict(positions="layer_rope"), "rope_bases"),
                       (dict(rope_bases=(10.0,)), "rope_bases"),
                       (dict(positions="layer_rope", rope_bases=(10.0, 20.0),
                             rope_scalings=(None,)), "rope_scalings")):
        with pytest.raises(ValueError, match=field):
            model_config(**bad)
