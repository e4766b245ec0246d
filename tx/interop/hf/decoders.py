"""Decoder-only LMs: LLaMA, Mistral (sliding window -> tx ``local``, ``Local(W - 1)``), GPT-2.

RoPE uses the rotate-half convention in tx and in HF LLaMA; its scaling variants (``linear``,
``dynamic``, ``llama3``, ``yarn``) map to ``tx.layers.RopeScaling``.
"""

from __future__ import annotations

import math

import numpy as np

from tx.config import ModelConfig
from tx.interop.hf.common import (Entry, attention, check_architecture, heads_out, linear, one,
                                  unsupported)
from tx.layers import RopeScaling

ARCHITECTURES = {"llama": {"LlamaForCausalLM": "lm"}, "mistral": {"MistralForCausalLM": "lm"},
                 "gpt2": {"GPT2LMHeadModel": "lm"}}
# Tied copies and buffers that hold no learned state.
IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


# -- RoPE scaling ------------------------------------------------------------------------------
def _yarn_attention_factor(spec: dict, factor: float) -> float:
    """YaRN's cos/sin gain: given, or ``0.1 ln(factor) + 1`` (DeepSeek's mscale ratio when
    ``mscale`` and ``mscale_all_dim`` are both set)."""
    if spec.get("attention_factor") is not None:
        return float(spec["attention_factor"])

    def gain(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    if spec.get("mscale") and spec.get("mscale_all_dim"):
        return gain(spec["mscale"]) / gain(spec["mscale_all_dim"])
    return gain()


def _scaling(option: str, spec: dict, hf: dict) -> RopeScaling:
    kind = spec.get("rope_type", spec.get("type"))
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported(f"{option}.partial_rotary_factor", spec["partial_rotary_factor"],
                    "tx rotates every dimension of a head.")
    max_len = hf.get("max_position_embeddings", 2048)
    original = spec.get("original_max_position_embeddings") or max_len
    if kind == "linear":
        return RopeScaling("linear", float(spec["factor"]))
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings
        return RopeScaling("dynamic", float(spec["factor"]), original_max_len=int(max_len))
    if kind == "llama3":
        return RopeScaling("llama3", float(spec["factor"]), original_max_len=int(original),
                           low_freq_factor=float(spec["low_freq_factor"]),
                           high_freq_factor=float(spec["high_freq_factor"]))
    if kind == "yarn":
        factor = float(spec.get("factor") or max_len / original)
        return RopeScaling("yarn", factor, original_max_len=int(original),
                           beta_fast=float(spec.get("beta_fast") or 32),
                           beta_slow=float(spec.get("beta_slow") or 1),
                           truncate=bool(spec.get("truncate", True)),
                           attention_factor=_yarn_attention_factor(spec, factor))
    unsupported(f"{option}.rope_type", kind, "tx implements RoPE scaling 'linear', 'dynamic', "
                "'llama3' and 'yarn'; convert the checkpoint or add the variant to "
                "tx/layers/rope_scaling.py.")


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from ``rope_parameters`` (transformers >= 5) or
    ``rope_theta``/``rope_scaling`` (older files)."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    for option, spec in (("rope_parameters", params), ("rope_scaling", hf.get("rope_scaling"))):
        if spec and spec.get("rope_type", spec.get("type", "default")) != "default":
            return theta, _scaling(option, spec, hf)
    return theta, None


def _rope_parameters(cfg: ModelConfig) -> dict:
    out = {"rope_type": "default", "rope_theta": cfg.rope_base}
    s = cfg.rope_scaling
    if s is None:
        return out
    out.update(rope_type=s.kind, factor=s.factor)
    if s.kind == "dynamic" and s.original_max_len != cfg.max_len:
        unsupported("rope_scaling.original_max_len", s.original_max_len, "HF's dynamic RoPE "
                    f"starts scaling at max_position_embeddings; set it to max_len={cfg.max_len}.")
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_len)
    if s.kind == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate,
                   attention_factor=s.attention_factor,
                   original_max_position_embeddings=s.original_max_len)
    return out


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _llama_like(hf: dict, model_type: str) -> dict:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        unsupported("hidden_act", act, "LLaMA-style MLPs are loaded as SwiGLU (silu only).")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // num_heads:
        head_dim = None  # implicit, as tx configs leave it
    theta, scaling = _rope(hf)
    fields = dict(
        family="decoder", task="lm", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        d_ff=hf["intermediate_size"], activation="swiglu", norm="rmsnorm", pre_norm=True,
        positions="rope", max_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention="causal",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_base=theta, rope_scaling=scaling,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)))
    if model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None:
            # HF: key j visible to query i iff i - W < j <= i, i.e. W keys: tx Local(W - 1).
            fields.update(attention="local", window=int(window))
    if hf.get("layer_types") and any(t != hf["layer_types"][0] for t in hf["layer_types"]):
        unsupported("layer_types", hf["layer_types"], "per-layer attention types are not "
                    "mapped yet; use a uniform config.")
    return fields


def _gpt2(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported("activation_function", act, "tx's 'gelu' is the tanh approximation "
                    "(gelu_new); exact gelu/relu GPT-2 variants are not mapped.")
    for option, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if option in hf and bool(hf[option]) != ok:
            unsupported(option, hf[option], f"tx's GPT-2 mapping needs {option}={ok}.")
    d = hf["n_embd"]
    return dict(family="decoder", task="lm", vocab_size=hf["vocab_size"], d_model=d,
                num_layers=hf["n_layer"], num_heads=hf["n_head"],
                d_ff=hf.get("n_inner") or 4 * d, activation="gelu", norm="layernorm",
                pre_norm=True, positions="learned", max_len=hf["n_positions"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention="causal",
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), attention_bias=True,
                mlp_bias=True)


def fields(hf: dict, model_type: str) -> dict:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    return _gpt2(hf) if model_type == "gpt2" else _llama_like(hf, model_type)


def model_type(cfg: ModelConfig) -> str | None:
    """``llama`` / ``mistral`` / ``gpt2`` when ``cfg`` is one of them, else None."""
    if cfg.family != "decoder" or cfg.layer_pattern or cfg.type_vocab_size or cfg.embed_norm \
            or cfg.head_transform or cfg.head_bias or cfg.head_scale != 1.0 or \
            cfg.attention_scale is not None:
        return None
    pattern = cfg._split_attention()[1]
    if (cfg.norm, cfg.activation, cfg.positions) == ("rmsnorm", "swiglu", "rope") and \
            cfg.pre_norm:
        if pattern == "local":
            return "mistral"
        if pattern in (None, "full", "causal"):
            return "llama"
        unsupported("attention", cfg.attention, "no HF LLaMA/Mistral equivalent.")
    if (cfg.norm, cfg.activation, cfg.positions) == ("layernorm", "gelu", "learned") and \
            cfg.pre_norm and cfg.attention_bias and cfg.mlp_bias and \
            pattern in (None, "full", "causal") and cfg.kv_heads == cfg.num_heads:
        return "gpt2"
    return None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    if model_type == "gpt2":
        if cfg.head_size * cfg.num_heads != cfg.d_model:
            unsupported("head_dim", cfg.head_dim, "GPT-2 needs head_dim * num_heads == d_model.")
        return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                    n_head=cfg.num_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_size, hidden_act="silu", max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              rope_theta=cfg.rope_base, rope_parameters=_rope_parameters(cfg),
              attention_dropout=0.0)
    if model_type == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    else:
        if cfg.attention_bias or cfg.mlp_bias:
            unsupported("attention_bias", True, "Mistral has no projection biases.")
        hf.update(sliding_window=cfg.window)
    return hf


# -- weights -----------------------------------------------------------------------------------
def _llama_entries(model, cfg: ModelConfig) -> list[Entry]:
    tower = model.tower
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    out = [one("model.embed_tokens.weight", tower.embed.table_vd),
           one("model.norm.weight", tower.final_norm.scale)]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, mlp = f"model.layers.{i}.", block.mlp
        out += attention(p + "self_attn.", block.self_attn, ("q_proj", "k_proj", "v_proj",
                                                             "o_proj"), n, k, h,
                         bias=cfg.attention_bias)
        out += [linear(p + "mlp.gate_proj.weight", mlp.wi_gate.kernel),
                linear(p + "mlp.up_proj.weight", mlp.wi_up.kernel),
                linear(p + "mlp.down_proj.weight", mlp.wo.kernel),
                one(p + "input_layernorm.weight", block.norms[0].scale),
                one(p + "post_attention_layernorm.weight", block.norms[1].scale)]
        if cfg.mlp_bias:
            out += [one(p + "mlp.gate_proj.bias", mlp.wi_gate.bias),
                    one(p + "mlp.up_proj.bias", mlp.wi_up.bias),
                    one(p + "mlp.down_proj.bias", mlp.wo.bias)]
    return out


def _gpt2_entries(model, cfg: ModelConfig) -> list[Entry]:
    tower = model.tower
    n, h, d = cfg.num_heads, cfg.head_size, cfg.d_model
    out = [one("transformer.wte.weight", tower.embed.table_vd),
           one("transformer.wpe.weight", tower.learned.table),
           one("transformer.ln_f.weight", tower.final_norm.scale),
           one("transformer.ln_f.bias", tower.final_norm.bias)]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, attn, mlp = f"transformer.h.{i}.", block.self_attn, block.mlp
        qkv = (attn.q_dnh, attn.k_dkh, attn.v_dkh)
        qkv_bias = (attn.q_bias_nh, attn.k_bias_kh, attn.v_bias_kh)
        out += [  # Conv1D stores [in, out]; c_attn's out axis is q | k | v, each head-major.
            Entry(p + "attn.c_attn.weight", qkv,
                  lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
                  lambda *ws: np.concatenate([x.reshape(d, n * h) for x in ws], axis=1)),
            Entry(p + "attn.c_attn.bias", qkv_bias,
                  lambda w: tuple(x.reshape(n, h) for x in np.split(w, 3)),
                  lambda *ws: np.concatenate([x.reshape(n * h) for x in ws])),
            one(p + "attn.c_proj.weight", attn.o_nhd, lambda w: w.reshape(n, h, d),
                lambda w: w.reshape(n * h, d)),
            one(p + "attn.c_proj.bias", attn.o_bias_d),
            one(p + "mlp.c_fc.weight", mlp.wi_gate.kernel),
            one(p + "mlp.c_fc.bias", mlp.wi_gate.bias),
            one(p + "mlp.c_proj.weight", mlp.wo.kernel),
            one(p + "mlp.c_proj.bias", mlp.wo.bias),
            one(p + "ln_1.weight", block.norms[0].scale),
            one(p + "ln_1.bias", block.norms[0].bias),
            one(p + "ln_2.weight", block.norms[1].scale),
            one(p + "ln_2.bias", block.norms[1].bias)]
    return out


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    return _gpt2_entries(model, cfg) if model_type == "gpt2" else _llama_entries(model, cfg)


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    """Tensor names (suffixes) a checkpoint may carry that tx does not need."""
    return IGNORED + (("lm_head.weight",) if cfg.tie_embeddings else ())


def prepare(tensors: dict, model_type: str) -> dict:
    """Accepts bare base-model checkpoints (``GPT2Model``: no ``transformer.`` prefix)."""
    if model_type == "gpt2" and "wte.weight" in tensors:
        return {f"transformer.{k}": v for k, v in tensors.items()}
    return tensors
