"""Decoder-only LMs: LLaMA, Mistral (sliding window -> tx ``local``, ``Local(W - 1)``), GPT-2.

RoPE uses the rotate-half convention in tx and in HF LLaMA; its scaling variants (``linear``,
``dynamic``, ``llama3``, ``yarn``) map to ``tx.layers.RopeScaling``.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from tx.kernels import masks
from tx.config import AttentionConfig, ModelConfig
from tx.interop.hf.common import (Entry, attention, check_architecture, linear, one,
                                  plain_body, register_family, sliding, uniform_mask,
                                  unsupported)
from tx.layers import LayerNorm, Learned, MLPConfig, RMSNorm, RoPE, RopeScaling
from tx.models.heads import LMHead

ARCHITECTURES = {"llama": {"LlamaForCausalLM": LMHead}, "mistral": {"MistralForCausalLM": LMHead},
                 "gpt2": {"GPT2LMHeadModel": LMHead}}
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


_HF_EXTRAS = {  # the fields of rope_parameters beyond rope_type and factor, by kind
    "llama3": lambda s: dict(low_freq_factor=s.low_freq_factor,
                             high_freq_factor=s.high_freq_factor,
                             original_max_position_embeddings=s.original_max_len),
    "yarn": lambda s: dict(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate,
                           attention_factor=s.attention_factor,
                           original_max_position_embeddings=s.original_max_len)}


def _rope_parameters(cfg: ModelConfig, max_len: int) -> dict:
    out = {"rope_type": "default", "rope_theta": cfg.positions.base}
    s = cfg.positions.scaling
    if s is None:
        return out
    out.update(rope_type=s.kind, factor=s.factor)
    if s.dynamic and s.original_max_len != max_len:
        unsupported("rope_scaling.original_max_len", s.original_max_len, "HF's dynamic RoPE "
                    f"starts scaling at max_position_embeddings; set it to {max_len}.")
    out.update(_HF_EXTRAS.get(s.kind, lambda s: {})(s))
    return out


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def llama_like(hf: dict, model_type: str) -> ModelConfig:
    """LLaMA's body (and Mistral's window): the base Qwen2, Phi-3 and Gemma 2 change."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        unsupported("hidden_act", act, "LLaMA-style MLPs are loaded as SwiGLU (silu only).")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // num_heads:
        head_dim = None  # implicit, as tx configs leave it
    theta, scaling = _rope(hf)
    mask = masks.Causal()
    if model_type == "mistral" and hf.get("sliding_window") is not None:
        mask = sliding(hf["sliding_window"])  # W keys: Local(W - 1)
    if hf.get("layer_types") and any(t != hf["layer_types"][0] for t in hf["layer_types"]):
        unsupported("layer_types", hf["layer_types"], "per-layer attention types are not "
                    "mapped yet; use a uniform config.")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(num_heads=num_heads, head_dim=head_dim, masks=(mask,),
                                  num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                                  bias=bool(hf.get("attention_bias", False))),
        positions=RoPE(theta, scaling, hf.get("max_position_embeddings", 2048)),
        mlp=MLPConfig(hf["intermediate_size"], jax.nn.silu, gated=True,
                      bias=bool(hf.get("mlp_bias", False))),
        norm=RMSNorm(float(hf.get("rms_norm_eps", 1e-6))),
        head=LMHead(tie=bool(hf.get("tie_word_embeddings", False))))


def _gpt2(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported("activation_function", act, "tx's 'gelu' is the tanh approximation "
                    "(gelu_new); exact gelu/relu GPT-2 variants are not mapped.")
    for option, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if option in hf and bool(hf[option]) != ok:
            unsupported(option, hf[option], f"tx's GPT-2 mapping needs {option}={ok}.")
    d, n = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
        attention=AttentionConfig(num_heads=n, num_kv_heads=n, masks=(masks.Causal(),),
                                  bias=True),
        positions=Learned(hf["n_positions"]),
        mlp=MLPConfig(hf.get("n_inner") or 4 * d, jax.nn.gelu, gated=False, bias=True),
        norm=LayerNorm(float(hf.get("layer_norm_epsilon", 1e-5))),
        head=LMHead(tie=bool(hf.get("tie_word_embeddings", True))))


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    return _gpt2(hf) if model_type == "gpt2" else llama_like(hf, model_type)


def _plain_lm(cfg: ModelConfig) -> bool:
    """A pre-norm decoder LM with no option HF's plain causal LMs lack."""
    head = cfg.head
    return (isinstance(head, LMHead) and plain_body(cfg) and not head.bias and
            head.scale == 1.0 and cfg.attention.scale is None and cfg.norm.pre)


def llama_shaped(cfg: ModelConfig) -> bool:
    """LLaMA's body (RMSNorm, RoPE, SwiGLU), whatever its masks and biases: Mistral, Qwen2 and
    Phi-3 share it."""
    mlp = cfg.mlp
    return (_plain_lm(cfg) and isinstance(cfg.norm, RMSNorm) and
            isinstance(cfg.positions, RoPE) and (mlp.activation, mlp.gated) == (jax.nn.silu, True))


def model_type(cfg: ModelConfig) -> str | None:
    """``llama`` / ``mistral`` / ``gpt2`` when ``cfg`` is one of them, else None."""
    a, mlp = cfg.attention, cfg.mlp
    if not _plain_lm(cfg) or a.out_bias not in (None, a.bias):  # o apart from q/k/v: Qwen2
        return None
    mask = uniform_mask(cfg)
    if llama_shaped(cfg):
        if isinstance(mask, masks.Local) and mask.right == 0:
            return "mistral"
        if mask == masks.Causal():
            return "llama"
        if not all(isinstance(m, masks.Mask) for m in a.masks):  # layer values (MLA): not
            return None  # LLaMA's; a later family (deepseek_v3) may hold them
        unsupported("attention.masks", a.masks, "no HF LLaMA/Mistral equivalent.")
    if isinstance(cfg.norm, LayerNorm) and isinstance(cfg.positions, Learned) and \
            (mlp.activation, mlp.gated) == (jax.nn.gelu, False) and a.bias and mlp.bias and \
            mask == masks.Causal() and a.kv_heads == a.num_heads:
        return "gpt2"
    return None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    tie = cfg.head.tie
    if model_type == "gpt2":
        if cfg.head_dim * cfg.num_heads != cfg.d_model:
            unsupported("head_dim", cfg.head_dim, "GPT-2 needs head_dim * num_heads == d_model.")
        return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                    n_head=cfg.num_heads, n_inner=cfg.mlp.d_ff,
                    n_positions=cfg.positions.max_len, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.norm.eps, tie_word_embeddings=tie, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)
    max_len = cfg.positions.trained_len or 2048  # RoPE has no table; HF records a length
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              intermediate_size=cfg.mlp.d_ff, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=max_len,
              rms_norm_eps=cfg.norm.eps, tie_word_embeddings=tie,
              rope_theta=cfg.positions.base, rope_parameters=_rope_parameters(cfg, max_len),
              attention_dropout=0.0)
    if model_type == "llama":
        hf.update(attention_bias=cfg.attention.bias, mlp_bias=cfg.mlp.bias)
    else:
        if cfg.attention.bias or cfg.mlp.bias:
            unsupported("attention_bias", True, "Mistral has no projection biases.")
        hf.update(sliding_window=uniform_mask(cfg).left + 1)  # Local(W - 1): W keys
    return hf


# -- weights -----------------------------------------------------------------------------------
def _llama_entries(model, cfg: ModelConfig) -> list[Entry]:
    tower = model.tower
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    out = [one("model.embed_tokens.weight", tower.embed.table_vd),
           one("model.norm.weight", tower.final_norm.scale)]
    if not cfg.head.tie:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, mlp = f"model.layers.{i}.", block.mlp
        out += attention(p + "self_attn.", block.self_attn, ("q_proj", "k_proj", "v_proj",
                                                             "o_proj"), n, k, h,
                         bias=cfg.attention.bias, out_bias=cfg.attention.out_bias)
        out += [linear(p + "mlp.gate_proj.weight", mlp.wi_gate.kernel),
                linear(p + "mlp.up_proj.weight", mlp.wi_up.kernel),
                linear(p + "mlp.down_proj.weight", mlp.wo.kernel),
                one(p + "input_layernorm.weight", block.norms[0].scale),
                one(p + "post_attention_layernorm.weight", block.norms[1].scale)]
        if cfg.mlp.bias:
            out += [one(p + "mlp.gate_proj.bias", mlp.wi_gate.bias),
                    one(p + "mlp.up_proj.bias", mlp.wi_up.bias),
                    one(p + "mlp.down_proj.bias", mlp.wo.bias)]
    return out


def _gpt2_entries(model, cfg: ModelConfig) -> list[Entry]:
    tower = model.tower
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    out = [one("transformer.wte.weight", tower.embed.table_vd),
           one("transformer.wpe.weight", tower.positions.table),
           one("transformer.ln_f.weight", tower.final_norm.scale),
           one("transformer.ln_f.bias", tower.final_norm.bias)]
    if not cfg.head.tie:
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
    return IGNORED + (("lm_head.weight",) if cfg.head.tie else ())


def prepare(tensors: dict, model_type: str) -> dict:
    """Accepts bare base-model checkpoints (``GPT2Model``: no ``transformer.`` prefix)."""
    if model_type == "gpt2" and "wte.weight" in tensors:
        return {f"transformer.{k}": v for k, v in tensors.items()}
    return tensors


register_family(__name__)
