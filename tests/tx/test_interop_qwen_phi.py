"""Qwen2 and Phi-3 <-> tx: tiny random ``transformers`` models (fp32, GQA 4:2, 2 layers), saved
with ``save_pretrained``, loaded into tx and compared on logits over a padded batch (max abs
diff <= 1e-4) and on greedy generation against ``transformers.generate`` token for token, with
the contiguous and the paged KV cache; tx -> HF files -> ``from_pretrained`` round trips (for
Phi-3 this re-fuses ``qkv_proj`` and ``gate_up_proj``); unsupported options fail by name.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
torch.set_num_threads(1)  # the CPU is shared with JAX and pytest-xdist workers

from tests.tx.hf_util import TOL, hf_greedy, hf_model, padded_batch, save  # noqa: E402
from tx.kernels import masks  # noqa: E402
from tx.inference import Contiguous, Paged, generate  # noqa: E402
from tx.config import replace  # noqa: E402
from tx.interop import hf  # noqa: E402
from tx.layers import RopeScaling  # noqa: E402

VOCAB, PAD, EOS = 97, 0, 2
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
            rope_parameters=dict(rope_type="default", rope_theta=500.0))
VARIANTS = {  # name: (class, config class, config changes, tx masks of the two layers)
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}, (masks.Causal(),) * 2),
    # Tied head; layer 0 full, layer 1 a window of 4 keys (shorter than every sequence here).
    "qwen2_tied_window": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
        max_window_layers=1), (masks.Causal(), masks.Local(3))),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}, (masks.Causal(),) * 2),
    "phi3_window": ("Phi3ForCausalLM", "Phi3Config", dict(sliding_window=4),
                    (masks.Local(3),) * 2),
}
MODEL_TYPE = {"Qwen2ForCausalLM": "qwen2", "Phi3ForCausalLM": "phi3"}
NEW = 10  # generated tokens: 6 + 10, well past the windows of 4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(name, HF model, tx model loaded from its saved files, HF's greedy continuation)."""
    cls_name, config_name, changes, _ = VARIANTS[request.param]
    # Weights N(0, 0.3) (biases too): HF's tiny init would predict one token everywhere.
    ref = hf_model(transformers, torch, cls_name, config_name, spread=0.3, **BASE, **changes)
    model = hf.load(save(tmp_path_factory, request.param, ref))
    prompt = np.random.RandomState(1).randint(3, VOCAB, (2, 6))
    want = hf_greedy(torch, ref, prompt, new=NEW, eos=EOS, pad=PAD)
    return request.param, ref, model, (prompt, want)


def _hf_logits(ref, ids, valid):
    with torch.no_grad():
        return ref(torch.tensor(ids), attention_mask=torch.tensor(
            valid.astype(np.int64))).logits.numpy()


def _max_diff(model, ref, seed=0) -> float:
    """Max abs logit difference over the valid positions of a right-padded batch."""
    ids, valid, lengths = padded_batch(VOCAB, seed=seed)
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    want = _hf_logits(ref, ids, valid)
    assert got.shape == want.shape
    return float(np.abs(got - want)[valid].max())


def test_logits_match_on_padded_batch(pair):
    name, ref, model, _ = pair
    assert tuple(b.self_attn.mask for b in model.tower.blocks) == VARIANTS[name][3]
    diff = _max_diff(model, ref)
    assert diff <= TOL, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("cache", [Contiguous(), Paged(4)], ids=["contiguous", "paged"])
def test_greedy_generation_matches(pair, cache):
    name, _, model, (prompt, want) = pair
    assert len(set(want.ravel())) > 2, f"{name}: HF's continuation is degenerate"
    got = generate(model, prompt, max_new_tokens=NEW, stop_tokens=(EOS,), cache=cache)
    np.testing.assert_array_equal(got.tokens, want, err_msg=name)


def test_config_and_weights_map_back_exactly(pair):
    name, ref, model, _ = pair
    model_type = MODEL_TYPE[VARIANTS[name][0]]
    assert hf.config_from_hf(hf.hf_config_from(model.config, model_type=model_type)) == \
        model.config
    # Qwen2 is its own config in tx; Phi-3 a LLaMA/Mistral one, saved as that unless named.
    unnamed = {"qwen2": "qwen2", "phi3": "mistral" if "window" in name else "llama"}
    assert hf.model_type_of(model.config) == unnamed[model_type]
    # Split on load, fused again on save: the very tensors HF saved.
    ours = hf.state_dict(model, model_type=model_type)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    if ref.config.tie_word_embeddings:
        del theirs["lm_head.weight"]  # a tied copy, which save leaves out
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def test_save_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    name, ref, model, _ = pair
    model_type = MODEL_TYPE[VARIANTS[name][0]]
    hf.save(model, tmp_path, model_type="phi3" if model_type == "phi3" else None)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(ref)
    assert _max_diff(model, again, seed=5) <= TOL
    ids = np.random.RandomState(6).randint(3, VOCAB, (2, 9))
    np.testing.assert_array_equal(_hf_logits(again, ids, np.ones_like(ids, bool)),
                                  _hf_logits(ref, ids, np.ones_like(ids, bool)))


# -- unsupported options fail by name ------------------------------------------------------------
def _hf_dict(model_type, **changes):
    return {**BASE, "model_type": model_type, **changes}


LONG = dict(short_factor=[1.0] * 2, long_factor=[2.0] * 2, original_max_position_embeddings=32)


@pytest.mark.parametrize("model_type, changes, option", [
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    ("qwen2", dict(layer_types=["full_attention"]), "layer_types"),  # one entry per layer
    # Sliding layers named, but use_sliding_window off: HF applies no window to them.
    ("qwen2", dict(layer_types=["sliding_attention"] * 2, sliding_window=4),
     "use_sliding_window"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2", dict(architectures=["Qwen2ForSequenceClassification"]), "architectures"),
    ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, **LONG)),
     "rope_parameters.rope_type"),
    # Older Phi-3 files: 'su' and 'yarn' both mean longrope there, not tx's YaRN.
    ("phi3", dict(rope_parameters=None, rope_scaling=dict(type="su", **LONG)),
     "rope_scaling.rope_type"),
    ("phi3", dict(rope_parameters=None, rope_scaling=dict(type="yarn", **LONG)),
     "rope_scaling.rope_type"),
    ("phi3", dict(partial_rotary_factor=0.75), "partial_rotary_factor"),
    ("phi3", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                       partial_rotary_factor=0.5)),
     "rope_parameters.partial_rotary_factor"),
])
def test_unsupported_option_raises_naming_it(model_type, changes, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        hf.config_from_hf(_hf_dict(model_type, **changes))


def test_supported_window_options_map_to_masks():
    """Windows that apply nowhere are plain causal attention; every layer sliding is local."""
    cases = [(dict(use_sliding_window=False, sliding_window=4), (masks.Causal(),)),
             (dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
              (masks.Causal(),)),
             (dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
              (masks.Local(3),))]
    for changes, want in cases:
        cfg = hf.config_from_hf(_hf_dict("qwen2", **changes))
        assert cfg.attention.masks == want, changes
        assert (cfg.attention.bias, cfg.attention.out_bias, cfg.mlp.bias) == (True, False, False)


def test_save_refuses_what_the_family_cannot_hold(pair, tmp_path):
    name, _, model, _ = pair
    other = "qwen2" if name.startswith("phi3") else "phi3"
    with pytest.raises(ValueError, match=f"model_type='{other}'"):
        hf.save(model, tmp_path, model_type=other)
    if name == "phi3":  # HF Phi-3 has no linear RoPE scaling
        rope = model.config.positions
        scaled = replace(model.config, positions=replace(rope, scaling=RopeScaling("linear", 2.0)))
        with pytest.raises(ValueError, match=r"positions\.scaling"):
            hf.hf_config_from(scaled, model_type="phi3")
