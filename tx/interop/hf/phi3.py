"""Phi-3 (``Phi3ForCausalLM``): LLaMA's body with fused projections, split into tx's separate
parameters on load and fused again on save.

``qkv_proj.weight`` is ``[(N + 2K) * H, D]``: q's rows, then k's, then v's, each head-major as
in ``common.heads_in``; ``gate_up_proj.weight`` is ``[2 * d_ff, D]``: gate's rows, then up's.
A ``sliding_window`` of W keys is tx ``Local(W - 1)``, as for Mistral.

RoPE must be plain. Phi-3's long-context ``longrope`` (``su`` and ``yarn`` are its older names
in Phi-3 files, not YaRN) switches between two sets of frequency factors with the sequence
length, which ``tx.layers.RopeScaling`` does not implement; and tx rotates every dimension of a
head, so ``partial_rotary_factor`` must be 1.

tx holds a Phi-3 model as a LLaMA (or Mistral) config, so ``save`` writes the Phi-3 layout only
when given ``model_type="phi3"``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tx.kernels import masks
from tx.config import ModelConfig
from tx.interop.hf import decoders
from tx.interop.hf.common import (Entry, check_architecture, heads_in, linear,
                                  register_family, sliding, uniform_mask, unsupported)
from tx.models.heads import LMHead

ARCHITECTURES = {"phi3": {"Phi3ForCausalLM": LMHead}}
# LLaMA's separate projections that Phi-3 stores fused.
_FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _check_rope(hf: dict) -> None:
    """Refuses what decoders' RoPE mapping would misread: Phi-3 spells longrope 'yarn'."""
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported("partial_rotary_factor", hf["partial_rotary_factor"], "tx rotates every "
                    "dimension of a head; only checkpoints with 1.0 (e.g. Phi-3-mini) load.")
    for option in ("rope_parameters", "rope_scaling"):
        spec = hf.get(option) or {}
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            unsupported(f"{option}.rope_type", kind, "Phi-3's long-context RoPE (longrope; "
                        "'su' and 'yarn' are its older names) picks short or long frequency "
                        "factors by sequence length, which tx does not implement; load a "
                        "checkpoint with plain RoPE (e.g. Phi-3-mini-4k) or add the variant to "
                        "tx/layers/rope_scaling.py.")
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            unsupported(f"{option}.partial_rotary_factor", spec["partial_rotary_factor"],
                        "tx rotates every dimension of a head; only 1.0 loads.")


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    _check_rope(hf)
    cfg = decoders.llama_like(hf, model_type)
    window = hf.get("sliding_window")
    mask = masks.Causal() if window is None else sliding(window)  # W keys: Local(W - 1)
    return replace(cfg, attention=replace(cfg.attention, bias=False, masks=(mask,)),
                   mlp=replace(cfg.mlp, bias=False))  # Phi-3 has no projection biases


def model_type(cfg: ModelConfig) -> str | None:
    """``phi3`` for any bias-free LLaMA or Mistral config. ``model_type_of`` asks ``decoders``
    first, so this family answers only when named (``save(..., model_type="phi3")``)."""
    if cfg.attention.bias or cfg.mlp.bias:
        return None
    return "phi3" if decoders.model_type(cfg) in ("llama", "mistral") else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    if cfg.positions.scaling is not None:
        unsupported("positions.scaling", cfg.positions.scaling, "HF Phi-3 has plain RoPE or "
                    "longrope only; save without model_type='phi3' (as LLaMA) to keep it.")
    hf = decoders.hf_config(cfg, "llama")
    del hf["attention_bias"], hf["mlp_bias"]  # not Phi-3 options: it has no biases
    mask = uniform_mask(cfg)
    window = mask.left + 1 if isinstance(mask, masks.Local) else None  # Local(W - 1): W keys
    # original_max_position_embeddings matters to longrope only; equal to the context, it
    # never triggers Phi-3's switch to long factors. tx knows no token ids, and Phi-3's
    # defaults (pad 32000) break a smaller vocabulary: unset, or from extra_config.
    hf.update(sliding_window=window,
              original_max_position_embeddings=hf["max_position_embeddings"],
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return hf


# -- weights -----------------------------------------------------------------------------------
def _fused(key: str, parts: list[Entry], rows: tuple[int, ...]) -> Entry:
    """One HF tensor made of ``parts``' HF tensors stacked along the rows (``rows`` each)."""
    cuts = np.cumsum(rows)[:-1]

    def to_tx(w):
        return tuple(part.to_tx(x)[0] for part, x in zip(parts, np.split(w, cuts)))

    def to_hf(*ws):
        return np.concatenate([part.to_hf(w) for part, w in zip(parts, ws)])
    return Entry(key, tuple(part.params[0] for part in parts), to_tx, to_hf)


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    n, k, h, f = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp.d_ff
    # LLaMA's names for the rest: embeddings, norms, o_proj, down_proj, lm_head.
    out = [e for e in decoders.entries(model, "llama") if e.key.split(".")[-2] not in _FUSED]
    for i, block in enumerate(model.tower.blocks):
        attn, mlp = block.self_attn, block.mlp
        qkv = f"model.layers.{i}.self_attn.qkv_proj.weight"
        gate_up = f"model.layers.{i}.mlp.gate_up_proj.weight"
        out += [_fused(qkv, [heads_in(qkv, attn.q_dnh, n, h), heads_in(qkv, attn.k_dkh, k, h),
                             heads_in(qkv, attn.v_dkh, k, h)], (n * h, k * h, k * h)),
                _fused(gate_up, [linear(gate_up, mlp.wi_gate.kernel),
                                 linear(gate_up, mlp.wi_up.kernel)], (f, f))]
    return out


ignored = decoders.ignored


def prepare(tensors: dict, model_type: str) -> dict:
    return tensors


register_family(__name__)
