"""Gemma 2 (``Gemma2ForCausalLM``): LLaMA's projections and RoPE, with Gemma's options as tx
values.

* Norms: RMSNorm scaling by ``1 + w`` (``w`` from 0) in fp32, ``RMSNorm(unit_offset=True)``,
  so the weights map unchanged; "sandwich" norms around both sub-layers,
  ``RMSNorm(sandwich=True)``: ``input_layernorm`` and ``pre_feedforward_layernorm`` are
  ``Block.norms``, ``post_attention_layernorm`` and ``post_feedforward_layernorm`` are
  ``Block.out_norms``.
* Embeddings times ``sqrt(hidden_size)``: ``EmbedConfig(scale=...)``; the tied head uses the
  unscaled table, as Gemma's does.
* ``attn_logit_softcapping``: ``AttentionConfig(score_mod=SoftCap(cap))``;
  ``final_logit_softcapping``: ``LMHead(softcap=cap)``; None turns either off.
* ``query_pre_attn_scalar``: the logits scale is its ``** -0.5`` (tx ``attention.scale``).
* ``layer_types``: a ``sliding_attention`` layer lets query i see key j iff
  ``i - sliding_window < j <= i`` (``sliding_window`` keys), tx ``Local(W - 1)``; the others
  are causal. Files without ``layer_types`` alternate, sliding first. The schedule is kept as
  its shortest period (Gemma 2: local, causal).
* MLP: GeGLU with the tanh GELU (``gelu_pytorch_tanh``), tx ``geglu``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import jax

from tx.kernels import masks, score_mods
from tx.config import EmbedConfig, ModelConfig
from tx.interop.hf import decoders
from tx.interop.hf.common import (FULL, SLIDING, Entry, check_architecture, layer_kinds,
                                   one, register_family, sliding, unsupported)
from tx.layers import MLPConfig, RMSNorm, RoPE
from tx.models.heads import LMHead

ARCHITECTURES = {"gemma2": {"Gemma2ForCausalLM": LMHead}}
_FULL, _SLIDING = FULL, SLIDING
# Gemma2Config's defaults, for files that leave a Gemma option out (sizes have none).
_DEFAULTS = dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                 max_position_embeddings=8192, tie_word_embeddings=True,
                 query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                 attn_logit_softcapping=50.0)
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")  # both 0.5x(1 + tanh(...)): jax.nn.gelu
# Options llama_like would misread: LLaMA's activation key (Gemma reads hidden_activation),
# and the attention pattern, mapped here.
_NOT_LLAMA = ("hidden_act", "layer_types", "sliding_window")


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _hf_layers(hf: dict) -> list[str]:
    """Each layer's HF attention kind."""
    n = hf["num_hidden_layers"]
    kinds = hf.get("layer_types") or [_SLIDING if i % 2 == 0 else _FULL for i in range(n)]
    if len(kinds) != n or not set(kinds) <= {_FULL, _SLIDING}:
        unsupported("layer_types", kinds, f"tx maps one of {(_FULL, _SLIDING)} per layer "
                    f"(num_hidden_layers={n}).")
    if _SLIDING in kinds and not hf["sliding_window"]:
        unsupported("sliding_window", hf["sliding_window"], f"layer_types has {_SLIDING!r} "
                    "layers; give a positive window, or make every layer full_attention.")
    return list(kinds)


def _period(kinds: list[str]) -> list[str]:
    """The shortest schedule that ``tx.config.cycle`` repeats into ``kinds``."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return kinds[:p]
    return kinds


def _check_options(hf: dict) -> None:
    act = hf["hidden_activation"]
    if act not in _TANH_GELU:
        unsupported("hidden_activation", act, f"Gemma 2's MLP loads as GeGLU with the tanh "
                    f"GELU only ({_TANH_GELU}).")
    if hf.get("use_bidirectional_attention"):
        unsupported("use_bidirectional_attention", hf["use_bidirectional_attention"],
                    "tx loads Gemma 2 as a causal LM only.")
    for option in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = hf[option]
        if cap is not None and not cap > 0:
            unsupported(option, cap, "give a cap > 0, or null for none.")


def _cap(hf: dict, option: str) -> float | None:
    return None if hf[option] is None else float(hf[option])


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    hf = {**_DEFAULTS, **hf}  # a null that is there stays: no softcap
    _check_options(hf)
    kinds = _hf_layers(hf)
    cfg = decoders.llama_like({k: v for k, v in hf.items() if k not in _NOT_LLAMA},
                              model_type)
    a = cfg.attention
    scalar = hf["query_pre_attn_scalar"]
    head_dim = a.head_dim or hf["hidden_size"] // hf["num_attention_heads"]
    local = sliding(hf["sliding_window"]) if _SLIDING in kinds else None  # Local(W - 1)
    cap = _cap(hf, "attn_logit_softcapping")
    attention = replace(
        a, scale=None if scalar == head_dim else float(scalar) ** -0.5,
        score_mod=None if cap is None else score_mods.SoftCap(cap),
        masks=tuple(local if k == _SLIDING else masks.Causal() for k in _period(kinds)))
    return replace(cfg, attention=attention,
                   mlp=MLPConfig(cfg.mlp.d_ff, jax.nn.gelu, gated=True, bias=False),
                   norm=replace(cfg.norm, sandwich=True, unit_offset=True),
                   head=LMHead(tie=bool(hf["tie_word_embeddings"]),
                               softcap=_cap(hf, "final_logit_softcapping")),
                   embed=EmbedConfig(scale=hf["hidden_size"] ** 0.5))


def _gemma_shaped(cfg: ModelConfig) -> bool:
    """A decoder LM with Gemma's norms: the config means Gemma 2 (and nothing else saves it)."""
    n = cfg.norm
    return (isinstance(cfg.head, LMHead) and isinstance(n, RMSNorm) and n.sandwich and
            n.unit_offset and not cfg.attention.qk_norm)  # q/k norms: Gemma 3


def _query_pre_attn_scalar(cfg: ModelConfig) -> int:
    """HF's integer whose ``** -0.5`` is the logits scale."""
    scale = cfg.attention.scale
    if scale is None:
        return cfg.head_dim
    scalar = round(scale ** -2)
    if not math.isclose(scalar ** -0.5, scale, rel_tol=1e-12):
        unsupported("attention.scale", scale, "Gemma 2 stores the scale as "
                    "query_pre_attn_scalar ** -0.5 with an integer query_pre_attn_scalar; "
                    "use 1 / sqrt(an integer), or None for head_dim ** -0.5.")
    return scalar


def _check_body(cfg: ModelConfig) -> None:
    """Every option of a Gemma-shaped config that Gemma 2 cannot hold fails by name."""
    a, head, mlp = cfg.attention, cfg.head, cfg.mlp
    checks = (
        ("positions", cfg.positions, isinstance(cfg.positions, RoPE), "Gemma 2 uses RoPE."),
        ("mlp", mlp, (mlp.activation, mlp.gated, mlp.bias) == (jax.nn.gelu, True, False),
         "Gemma 2's MLP is GeGLU (tanh GELU) without biases."),
        ("embed", cfg.embed, cfg.embed.type_vocab_size == 0 and not cfg.embed.norm and
         math.isclose(cfg.embed.scale, cfg.d_model ** 0.5, rel_tol=1e-12),
         f"Gemma 2 scales its embeddings by d_model ** 0.5 = {cfg.d_model ** 0.5} and has "
         "neither token types nor an embedding norm."),
        ("head", head, not head.bias and head.scale == 1.0, "Gemma 2's head has no bias and no "
         "hidden-state scale."),
        ("attention.out_bias", a.out_bias, a.out_bias in (None, a.bias), "Gemma 2's "
         "attention_bias covers q, k, v and o alike."),
        ("attention.score_mod", a.score_mod, a.score_mod is None or
         type(a.score_mod) is score_mods.SoftCap, "Gemma 2 soft-caps the logits "
         "(SoftCap(cap)) or leaves them alone (None)."),
        ("attention.sinks", a.sinks, not a.sinks, "Gemma 2 has no attention sinks."))
    for field, value, ok, why in checks:
        if not ok:
            unsupported(field, value, why)


def model_type(cfg: ModelConfig) -> str | None:
    """``gemma2`` for a decoder LM with sandwich unit-offset RMSNorms; any other option Gemma 2
    lacks then fails by name."""
    if not _gemma_shaped(cfg):
        return None
    _check_body(cfg)
    layer_kinds(cfg, "Gemma 2")
    _query_pre_attn_scalar(cfg)
    return "gemma2"


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    hf = decoders.hf_config(cfg, "llama")  # sizes, RoPE, eps, tying
    del hf["hidden_act"], hf["mlp_bias"]  # Gemma reads hidden_activation; no MLP biases
    kinds, window = layer_kinds(cfg, "Gemma 2")
    soft = cfg.attention.score_mod
    # HF builds the sliding mask even when no layer uses it, so it needs some window.
    hf.update(hidden_activation="gelu_pytorch_tanh", layer_types=kinds,
              sliding_window=window or hf["max_position_embeddings"],
              query_pre_attn_scalar=_query_pre_attn_scalar(cfg),
              attn_logit_softcapping=None if soft is None else soft.cap,
              final_logit_softcapping=cfg.head.softcap)
    return hf


# -- weights -----------------------------------------------------------------------------------
# HF norm name -> (tx list, index): the pre-norms are Block.norms, the post-norms out_norms.
_NORMS = {"input_layernorm": ("norms", 0), "post_attention_layernorm": ("out_norms", 0),
          "pre_feedforward_layernorm": ("norms", 1), "post_feedforward_layernorm": ("out_norms", 1)}


def entries(model, model_type: str) -> list[Entry]:
    # LLaMA's names for embeddings, projections, final norm and lm_head; its two per-layer
    # norms mean something else here, so Gemma's four are mapped below.
    out = [e for e in decoders.entries(model, "llama") if not e.key.endswith("layernorm.weight")]
    for i, block in enumerate(model.tower.blocks):
        for name, (where, j) in _NORMS.items():
            out.append(one(f"model.layers.{i}.{name}.weight", getattr(block, where)[j].scale))
    return out


ignored = decoders.ignored


def prepare(tensors: dict, model_type: str) -> dict:
    return tensors


register_family(__name__)
