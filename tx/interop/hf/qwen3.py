"""Qwen3 (``Qwen3ForCausalLM``): LLaMA's body with per-head q/k RMSNorms, tx
``AttentionConfig(qk_norm=True)`` (the model's RMSNorm over head_dim, after the projections and
before RoPE), named ``self_attn.q_norm`` / ``self_attn.k_norm``.

``attention_bias`` covers q, k, v and o alike (unlike Qwen2); the MLP has no biases. Sliding
layers are read as Qwen2's are (``layer_types``, else ``use_sliding_window`` from
``max_window_layers`` on): a window of W keys is tx ``Local(W - 1)``.
"""

from __future__ import annotations

from dataclasses import replace

from tx.config import ModelConfig
from tx.interop.hf import decoders, qwen2
from tx.interop.hf.common import (Entry, check_architecture, layer_kinds, qk_norm_entries,
                                   register_family, unchanged, unsupported)
from tx.models.heads import LMHead

ARCHITECTURES = {"qwen3": {"Qwen3ForCausalLM": LMHead}}


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    kinds, window = qwen2._hf_layers(hf)
    cfg = decoders.llama_like({k: v for k, v in hf.items() if k != "layer_types"}, model_type)
    if hf.get("mlp_bias"):  # Qwen3's MLP has none, whatever the file says
        unsupported("mlp_bias", hf["mlp_bias"], "Qwen3's MLP has no biases.")
    return replace(cfg, attention=replace(cfg.attention, qk_norm=True,
                                          masks=qwen2._masks(kinds, window)))


def model_type(cfg: ModelConfig) -> str | None:
    """``qwen3`` for a LLaMA-shaped config with per-head q/k norms, biases on all of q/k/v/o
    or none, and none on the MLP."""
    a = cfg.attention
    if not a.qk_norm:
        return None
    if not decoders.llama_shaped(replace(cfg, attention=replace(a, qk_norm=False))):
        return None
    if a.out_bias not in (None, a.bias):
        unsupported("attention.out_bias", a.out_bias, "Qwen3's attention_bias covers q, k, v "
                    "and o alike.")
    if cfg.mlp.bias:
        unsupported("mlp.bias", cfg.mlp.bias, "Qwen3's MLP has no biases.")
    layer_kinds(cfg, "Qwen3")  # masks Qwen3 has no layer type for fail here, by name
    return "qwen3"


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    hf = decoders.hf_config(cfg, "llama")
    del hf["mlp_bias"]  # not a Qwen3 option
    kinds, window = layer_kinds(cfg, "Qwen3")
    hf.update(use_sliding_window=window is not None, sliding_window=window, layer_types=kinds,
              max_window_layers=kinds.index("sliding_attention") if window else cfg.num_layers)
    return hf


# -- weights -----------------------------------------------------------------------------------
def entries(model, model_type: str) -> list[Entry]:
    return decoders.entries(model, "llama") + qk_norm_entries(model)


ignored, prepare = decoders.ignored, unchanged


register_family(__name__)
