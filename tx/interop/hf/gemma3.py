"""Gemma 3 text (``Gemma3ForCausalLM``, ``Gemma3TextConfig``): Gemma 2's body (``gemma2.py``:
sandwich unit-offset RMSNorms, scaled embeddings, GeGLU, ``query_pre_attn_scalar``, optional
soft caps) plus

* per-head q/k norms, tx ``AttentionConfig(qk_norm=True)``: Gemma's ``1 + w`` RMSNorm over
  head_dim before RoPE (``self_attn.q_norm`` / ``self_attn.k_norm``);
* a RoPE per layer kind, tx ``LayerRoPE`` cycled with the masks: ``rope_parameters``
  ``{"full_attention": ..., "sliding_attention": ...}`` (transformers >= 5), or the older
  ``rope_theta`` (global layers, with ``rope_scaling``) and ``rope_local_base_freq`` (sliding
  layers); one ``RoPE`` when every layer turns alike;
* ``layer_types`` defaulting to five sliding layers then a global one
  (``sliding_window_pattern``, 6).

RoPE scaling is mapped for ``linear`` only (the Gemma 3 checkpoints' kind); any other kind is
refused by name, as are ``use_bidirectional_attention`` and a non-null
``attn_logit_softcapping`` (transformers' Gemma 3 keeps the option but never applies it, so no
value of it would reproduce HF's logits and mean the same thing). ``final_logit_softcapping``
applies, as in Gemma 2.
"""

from __future__ import annotations

import types
from dataclasses import replace

from tx.config import ModelConfig
from tx.interop.hf import decoders, gemma2
from tx.interop.hf.common import (FULL, SLIDING, Entry, check_architecture, layer_kinds,
                                   qk_norm_entries, register_family, unchanged,
                                   unsupported)
from tx.layers import RoPE
from tx.layers.positions import LayerRoPE
from tx.models.heads import LMHead

ARCHITECTURES = {"gemma3_text": {"Gemma3ForCausalLM": LMHead}}
# Gemma3TextConfig's defaults, for files that leave a Gemma option out (sizes have none).
_DEFAULTS = dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                 max_position_embeddings=131_072, tie_word_embeddings=True,
                 query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                 attn_logit_softcapping=None)
_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}  # Gemma3TextConfig.default_theta
_SCALINGS = ("linear",)  # RoPE scaling kinds mapped (and checked) for Gemma 3
_ROPE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rope_local_base_freq")


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _kinds(hf: dict) -> list[str]:
    n, every = hf["num_hidden_layers"], hf.get("sliding_window_pattern", 6)
    return hf.get("layer_types") or [SLIDING if (i + 1) % every else FULL for i in range(n)]


def _rope_specs(hf: dict) -> dict[str, dict]:
    """HF's RoPE parameters of each layer kind."""
    params = hf.get("rope_parameters")
    if params and set(params) <= {FULL, SLIDING}:
        specs = {kind: dict(params.get(kind) or {}) for kind in (FULL, SLIDING)}
    else:  # one flat dict, or none: the global layers'
        specs = {FULL: dict(params or {}), SLIDING: {}}
    legacy = hf.get("rope_scaling")
    if legacy and not set(legacy) <= {FULL, SLIDING}:  # the global layers', as HF reads it
        specs[FULL].update(legacy)
    specs[FULL].setdefault("rope_theta", hf.get("rope_theta", _THETA[FULL]))
    specs[SLIDING].setdefault("rope_theta", hf.get("rope_local_base_freq", _THETA[SLIDING]))
    return specs


def _rope(kind: str, spec: dict, hf: dict) -> RoPE:
    option = f"rope_parameters.{kind}"
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    scaling = None
    if rope_type != "default":
        if rope_type not in _SCALINGS:
            unsupported(f"{option}.rope_type", rope_type, f"tx maps Gemma 3's RoPE scaling "
                        f"{_SCALINGS} only; convert the checkpoint.")
        scaling = decoders._scaling(option, spec, hf)
    return RoPE(float(spec["rope_theta"]), scaling, hf["max_position_embeddings"])


def _positions(hf: dict, kinds: list[str]):
    """One RoPE when every layer turns alike, else a ``LayerRoPE`` over the masks' period."""
    specs = _rope_specs(hf)
    ropes = {kind: _rope(kind, specs[kind], hf) for kind in set(kinds)}
    if len(set(ropes.values())) == 1:
        return next(iter(ropes.values()))
    return LayerRoPE(tuple(ropes[k] for k in gemma2._period(kinds)))


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    hf = {**_DEFAULTS, **hf}
    if hf["attn_logit_softcapping"] is not None:
        unsupported("attn_logit_softcapping", hf["attn_logit_softcapping"], "transformers' "
                    "Gemma 3 ignores it (its attention is never soft-capped); set null.")
    kinds = _kinds(hf)
    body = {k: v for k, v in hf.items() if k not in _ROPE_KEYS + ("architectures",)}
    cfg = gemma2.config({**body, "layer_types": kinds}, "gemma2")  # checks Gemma's options
    return replace(cfg, attention=replace(cfg.attention, qk_norm=True),
                   positions=_positions(hf, kinds))


def _layer_ropes(cfg: ModelConfig, kinds: list[str]) -> dict[str, RoPE]:
    """Each layer kind's one RoPE; a kind turning two ways fails by name."""
    pos = cfg.positions
    found: dict[str, set] = {FULL: set(), SLIDING: set()}
    for i, kind in enumerate(kinds):
        found[kind].add(pos.layer(i) if isinstance(pos, LayerRoPE) else pos)
    for kind, ropes in found.items():
        if len(ropes) > 1:
            unsupported("positions", pos, f"Gemma 3 has one RoPE per layer kind; its {kind} "
                        f"layers turn {len(ropes)} ways.")
        for rope in ropes:
            if rope.scaling is not None and rope.scaling.kind not in _SCALINGS:
                unsupported("positions.scaling", rope.scaling, f"tx maps Gemma 3's RoPE "
                            f"scaling {_SCALINGS} only.")
    return {kind: ropes.pop() for kind, ropes in found.items() if ropes}


def model_type(cfg: ModelConfig) -> str | None:
    """``gemma3_text`` for a Gemma-shaped decoder LM (sandwich unit-offset RMSNorms) with
    per-head q/k norms; any other option Gemma 3 lacks then fails by name."""
    if not cfg.attention.qk_norm:
        return None
    plain = replace(cfg, attention=replace(cfg.attention, qk_norm=False))
    if not gemma2._gemma_shaped(plain):
        return None
    if cfg.attention.score_mod is not None:
        unsupported("attention.score_mod", cfg.attention.score_mod, "Gemma 3 leaves the "
                    "attention logits alone (transformers ignores attn_logit_softcapping).")
    if not isinstance(cfg.positions, (RoPE, LayerRoPE)):
        unsupported("positions", cfg.positions, "Gemma 3 uses RoPE (one per layer kind: "
                    "tx.layers.positions.LayerRoPE).")
    kinds, _ = layer_kinds(cfg, "Gemma 3")
    _layer_ropes(cfg, kinds)
    gemma2.model_type(replace(plain, positions=RoPE()))  # Gemma 2's checks, by field
    return "gemma3_text"


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    kinds, _ = layer_kinds(cfg, "Gemma 3")
    ropes = _layer_ropes(cfg, kinds)
    plain = replace(cfg, attention=replace(cfg.attention, qk_norm=False),
                    positions=ropes.get(FULL) or ropes[SLIDING])
    hf = gemma2.hf_config(plain, "gemma2")
    max_len = hf["max_position_embeddings"]
    params = {}
    for kind in (FULL, SLIDING):  # HF wants both, even for a kind no layer has
        rope = ropes.get(kind) or RoPE(_THETA[kind])
        params[kind] = decoders._rope_parameters(types.SimpleNamespace(positions=rope), max_len)
    del hf["rope_theta"]
    hf.update(rope_parameters=params, use_bidirectional_attention=False)
    return hf


# -- weights -----------------------------------------------------------------------------------
def entries(model, model_type: str) -> list[Entry]:
    return gemma2.entries(model, "gemma2") + qk_norm_entries(model)


ignored, prepare = decoders.ignored, unchanged


register_family(__name__)
