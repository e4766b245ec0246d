"""Hugging Face interop: tiny random ``transformers`` models, saved with ``save_pretrained``,
loaded into tx and compared on logits (fp32, max abs diff <= 1e-4, padded batches) and greedy
generation (token for token); tx -> HF files -> ``transformers`` round trips; attention swaps
after loading; unsupported options fail by name. No downloads: every model is built here.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
torch.set_num_threads(1)  # the CPU is shared with JAX and pytest-xdist workers

from tx.kernels import masks  # noqa: E402
from tx import models  # noqa: E402
from tx.flags import model_config  # noqa: E402
from tx.layers import LayerNorm, Learned  # noqa: E402
from tx.inference import generate  # noqa: E402
from tx.interop import hf, pool_kv_heads, set_masks  # noqa: E402

TOL = 1e-4
VOCAB = 97
EOS = 2


def _llama_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=EOS,
                pad_token_id=0, max_position_embeddings=64)
    base.update(kw)
    return base


def _save(tmp_path_factory, name, model):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return str(path)


def _hf_model(cls_name, config_name, **config):
    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(**config)
    return getattr(transformers, cls_name)(cfg).eval()


# -- fixtures: one HF model per variant, saved once ----------------------------------------------
VARIANTS = {
    # GQA ratio 2, untied head, non-default theta and eps.
    "llama_gqa": ("LlamaForCausalLM", "LlamaConfig", _llama_config()),
    # MQA (ratio 4), tied embeddings, head_dim != d_model / num_heads, projection biases.
    "llama_mqa_bias": ("LlamaForCausalLM", "LlamaConfig", _llama_config(
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True)),
    # Sliding window of 4 keys, shorter than every test sequence.
    "mistral": ("MistralForCausalLM", "MistralConfig", _llama_config(sliding_window=4)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(name, HF model, tx model loaded from the HF model's saved files)."""
    cls_name, config_name, config = VARIANTS[request.param]
    ref = _hf_model(cls_name, config_name, **config)
    path = _save(tmp_path_factory, request.param, ref)
    return request.param, ref, hf.load(path)


def _hf_logits(ref, ids, attention_mask=None):
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return ref(torch.tensor(ids), **kw).logits.numpy()


def _padded_batch(seed=0, t=12, lengths=(12, 7, 3)):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (len(lengths), t))
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    return np.where(valid, ids, 0), valid, np.asarray(lengths, np.int32)


# -- (1, 2, 6) logits and greedy generation ------------------------------------------------------
def test_logits_match_on_padded_batch(pair):
    name, ref, model = pair
    ids, valid, lengths = _padded_batch()
    want = _hf_logits(ref, ids, valid.astype(np.int64))
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert got.shape == want.shape
    diff = np.abs(got - want)[valid].max()  # right-padded rows: valid positions only
    assert diff <= TOL, f"{name}: max abs logit diff {diff}"
    if name == "mistral":  # HF's window of 4 keys is tx's Local(3)
        assert model.tower.blocks[0].self_attn.mask == masks.Local(3)


def test_greedy_generation_matches(pair):
    name, ref, model = pair
    prompt = np.random.RandomState(1).randint(3, VOCAB, (2, 6))
    new = 10  # 6 + 10 tokens: well past Mistral's window of 4
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompt), attention_mask=torch.ones_like(
            torch.tensor(prompt)), do_sample=False, max_new_tokens=new, eos_token_id=EOS,
            pad_token_id=0).numpy()[:, prompt.shape[1]:]
    want = np.zeros((2, new), np.int64)
    want[:, :out.shape[1]] = out  # HF stops once every row is done; tx pads with PAD = 0
    got = generate(model, prompt, max_new_tokens=new, stop_tokens=(EOS,))
    np.testing.assert_array_equal(got.tokens, want, err_msg=name)


def test_config_mapping():
    cfg = hf.config_from_hf(dict(model_type="mistral", **_llama_config(sliding_window=4)))
    assert (cfg.kv_heads, cfg.head_dim, cfg.norm.eps, cfg.positions.base) == (2, 8, 1e-5, 5000.0)
    assert cfg.attention.masks == (masks.Local(3),)
    gpt2 = hf.config_from_hf(dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=1,
                                  n_head=2, n_positions=32))
    assert (gpt2.positions, gpt2.norm, gpt2.mlp.d_ff, gpt2.attention.bias) == \
        (Learned(32), LayerNorm(1e-5), 64, True)


# -- sharded checkpoints -------------------------------------------------------------------------
def test_sharded_checkpoint_loads(tmp_path):
    cls_name, config_name, config = VARIANTS["llama_gqa"]
    ref = _hf_model(cls_name, config_name, **config)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids, valid, lengths = _padded_batch(seed=3)
    got = np.asarray(hf.load(tmp_path)(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - _hf_logits(ref, ids, valid.astype(np.int64)))[valid].max() <= TOL


# -- (3) tx -> HF files -> transformers ----------------------------------------------------------
ROUND_TRIP = {
    "llama": dict(activation="swiglu", norm="rmsnorm", positions="rope", num_kv_heads=2,
                  tie_embeddings=False, norm_eps=1e-5, rope_base=500.0, attention="causal"),
    "mistral": dict(activation="swiglu", norm="rmsnorm", positions="rope", num_kv_heads=1,
                    tie_embeddings=True, attention="local", window=5),
    "gpt2": dict(activation="gelu", norm="layernorm", positions="learned", norm_eps=1e-5,
                 attention_bias=True, mlp_bias=True, tie_embeddings=True, attention="causal"),
}


@pytest.mark.parametrize("model_type", sorted(ROUND_TRIP))
def test_round_trip_to_transformers(model_type, tmp_path):
    cfg = model_config(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, d_ff=48,
                      max_len=64, **ROUND_TRIP[model_type])
    model = models.build(cfg, seed=3)
    # Non-trivial norms and biases, so a dropped or misplaced one shows.
    rng = np.random.RandomState(4)
    for entry_key, value in hf.state_dict(model).items():
        if entry_key.endswith(("norm.weight", "bias", "ln_1.weight", "ln_2.weight",
                               "ln_f.weight")):
            value = value + 0.1 * rng.standard_normal(value.shape).astype(np.float32)
            hf.load_weights(model, {**hf.state_dict(model), entry_key: value})
    hf.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, valid, lengths = _padded_batch(seed=5)
    want = _hf_logits(ref, ids, valid.astype(np.int64))
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - want)[valid].max() <= TOL
    # ... and back again: HF's own save loads into tx unchanged.
    ref.save_pretrained(tmp_path / "again")
    again = hf.load(tmp_path / "again")
    assert again.config == model.config
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids))),
                               np.asarray(model(jnp.asarray(ids))), atol=1e-6)


# -- (4) attention swaps after loading -----------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cls_name, config_name, config = VARIANTS["llama_gqa"]
    ref = _hf_model(cls_name, config_name, **config)
    return ref, _save(tmp_path_factory, "llama_swap", ref)


def test_swap_to_local_mask_is_mistral_with_the_same_weights(llama):
    ref, path = llama
    model = hf.load(path)
    ids = np.random.RandomState(6).randint(3, VOCAB, (2, 12))
    before = np.asarray(model(jnp.asarray(ids)))
    set_masks(model, masks.Local(11))  # a window as long as the sequence: nothing changes
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), before, atol=1e-6)
    set_masks(model, masks.Local(2))  # 3 keys per query
    after = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(after[:, :3], before[:, :3], atol=1e-6)  # window not yet binding
    assert np.abs(after[:, 3:] - before[:, 3:]).max() > 1e-3
    # The same weights in HF Mistral with a 3-key window compute exactly this.
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        **_llama_config(sliding_window=3))).eval()
    mistral.load_state_dict(ref.state_dict())
    assert np.abs(after - _hf_logits(mistral, ids)).max() <= TOL
    # And it still generates (rolling cache for the window) like Mistral does.
    prompt = ids[:, :5]
    with torch.no_grad():
        want = mistral.generate(torch.tensor(prompt), attention_mask=torch.ones_like(
            torch.tensor(prompt)), do_sample=False, max_new_tokens=6, eos_token_id=None,
            pad_token_id=0).numpy()[:, 5:]
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=6).tokens,
                                  want)


def test_swap_to_fewer_kv_heads_by_mean_pooling(llama):
    ref, path = llama
    model = hf.load(path)
    ids = np.random.RandomState(7).randint(3, VOCAB, (2, 10))
    before = np.asarray(model(jnp.asarray(ids)))
    pool_kv_heads(model, 2)  # no-op: already 2 K/V heads
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), before, atol=1e-6)
    pool_kv_heads(model, 1)  # GQA -> MQA
    assert model.config.kv_heads == 1
    assert model.tower.blocks[0].self_attn.k_dkh[...].shape == (32, 1, 8)
    after = np.asarray(model(jnp.asarray(ids)))
    assert np.all(np.isfinite(after)) and np.abs(after - before).max() > 1e-3
    # Reference: HF LLaMA with one K/V head whose k/v projections are the mean of the two.
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = state[key].reshape(2, 8, 32).mean(0)
    mqa = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_llama_config(num_key_value_heads=1))).eval()
    mqa.load_state_dict(state)
    assert np.abs(after - _hf_logits(mqa, ids)).max() <= TOL
    with pytest.raises(ValueError, match="num_kv_heads"):
        pool_kv_heads(model, 3)


# -- RoPE scaling variants (LLaMA) ---------------------------------------------------------------
# Sequences of 12 and generation to 16 tokens run past each variant's original context of 8.
ROPE = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),  # grows the base past max_position (8)
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """``scaled(kind) -> (HF model, checkpoint path)``, each built and saved once."""
    built = {}

    def get(kind):
        if kind not in built:
            config = _llama_config(max_position_embeddings=8 if kind == "dynamic" else 32,
                                   rope_parameters=dict(rope_theta=500.0, **ROPE[kind]))
            ref = _hf_model("LlamaForCausalLM", "LlamaConfig", **config)
            built[kind] = ref, _save(tmp_path_factory, f"rope_{kind}", ref)
        return built[kind]
    return get


@pytest.mark.parametrize("kind", sorted(ROPE))
def test_rope_scaling_logits_match(scaled, kind):
    ref, path = scaled(kind)
    model = hf.load(path)
    assert model.config.positions.scaling.kind == kind
    ids, valid, lengths = _padded_batch()
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - _hf_logits(ref, ids, valid.astype(np.int64)))[valid].max() <= TOL, kind
    plain = hf.load(path, rope_scaling=None)  # the same weights with unscaled RoPE differ
    assert np.abs(np.asarray(plain(jnp.asarray(ids))) - got)[valid].max() > 1e-3, kind
    # config.json -> tx -> config.json -> tx is the identity.
    assert hf.config_from_hf(hf.hf_config_from(model.config)) == model.config


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])  # static frequencies: logits suffice
def test_rope_scaling_generation_matches(scaled, kind):
    ref, path = scaled(kind)
    prompt = np.random.RandomState(1).randint(3, VOCAB, (2, 6))
    with torch.no_grad():  # the dynamic base grows token by token from position 8 on
        want = ref.generate(torch.tensor(prompt), attention_mask=torch.ones_like(
            torch.tensor(prompt)), do_sample=False, max_new_tokens=10, eos_token_id=None,
            pad_token_id=0).numpy()[:, 6:]
    got = generate(hf.load(path), prompt, max_new_tokens=10)
    np.testing.assert_array_equal(got.tokens, want, err_msg=kind)


# -- (5) unsupported options fail by name --------------------------------------------------------
@pytest.mark.parametrize("change, option", [
    (dict(rope_scaling={"rope_type": "longrope", "factor": 4.0}), "rope_scaling.rope_type"),
    (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}),
     "rope_parameters.rope_type"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                           "partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="falcon"), "model_type"),
    (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
])
def test_unsupported_option_raises_naming_it(change, option):
    config = dict(model_type="llama", **_llama_config())
    config.update(change)
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        hf.config_from_hf(config)


def test_unsupported_gpt2_option_and_stray_tensor(llama, tmp_path):
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        hf.config_from_hf(dict(model_type="gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                               n_positions=32, scale_attn_by_inverse_layer_idx=True))
    _, path = llama
    model = hf.load(path)
    tensors = hf.read_safetensors(path)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="q_norm"):
        hf.load_weights(model, tensors)
    with pytest.raises(ValueError, match="no supported Hugging Face equivalent"):
        hf.save(models.build(model_config(positions="alibi")), tmp_path)
