"""Qwen2 (``Qwen2ForCausalLM``): LLaMA's body with biases on the q/k/v projections, none on o.

Sliding windows. HF slides a window of ``sliding_window`` keys in the layers that
``layer_types`` marks ``sliding_attention``; files without ``layer_types`` slide in the layers
from ``max_window_layers`` on, and only when ``use_sliding_window`` is set. A window of W keys
is tx ``Local(W - 1)`` (as for Mistral), every other layer is causal; a mix becomes a per-layer
``layer_pattern``.
"""

from __future__ import annotations

from dataclasses import replace

from tx.kernels import masks
from tx.config import ModelConfig
from tx.interop.hf import decoders
from tx.interop.hf.common import (FULL, SLIDING, Entry, check_architecture, layer_kinds,
                                   register_family, sliding, unsupported)
from tx.models.heads import LMHead

ARCHITECTURES = {"qwen2": {"Qwen2ForCausalLM": LMHead}}
_FULL, _SLIDING = FULL, SLIDING
_MAX_WINDOW_LAYERS = 28  # HF's default when a file leaves max_window_layers out


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _hf_layers(hf: dict) -> tuple[list[str], int | None]:
    """Each layer's HF attention kind, and the window (keys) of the sliding ones."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    kinds = hf.get("layer_types")
    if kinds is None:
        first = hf.get("max_window_layers", _MAX_WINDOW_LAYERS)
        kinds = [_SLIDING if window is not None and i >= first else _FULL for i in range(n)]
    if len(kinds) != n or not set(kinds) <= {_FULL, _SLIDING}:
        unsupported("layer_types", kinds, f"tx maps one of {(_FULL, _SLIDING)} per layer "
                    f"(num_hidden_layers={n}).")
    if _SLIDING in kinds and not window:
        unsupported("use_sliding_window", hf.get("use_sliding_window"),
                    f"layer_types has {_SLIDING!r} layers but no window applies "
                    f"(sliding_window={hf.get('sliding_window')!r}); set use_sliding_window="
                    "true and a positive sliding_window, or make every layer full_attention.")
    return kinds, window


def _masks(kinds: list[str], window: int | None) -> tuple:
    """One mask per layer; a single one when every layer has the same."""
    if _SLIDING not in kinds:
        return (masks.Causal(),)
    local = sliding(window)  # W keys: Local(W - 1)
    if _FULL not in kinds:
        return (local,)
    return tuple(local if k == _SLIDING else masks.Causal() for k in kinds)


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    kinds, window = _hf_layers(hf)
    # llama_like refuses mixed layer_types; here they are mapped above instead.
    cfg = decoders.llama_like({k: v for k, v in hf.items() if k != "layer_types"}, model_type)
    # Qwen2's projection biases are fixed by the architecture, whatever the file says.
    return replace(cfg, attention=replace(cfg.attention, bias=True, out_bias=False,
                                          masks=_masks(kinds, window)),
                   mlp=replace(cfg.mlp, bias=False))


def model_type(cfg: ModelConfig) -> str | None:
    """``qwen2`` for a LLaMA-shaped config with q/k/v biases and none on o or the MLP."""
    a = cfg.attention
    if not (decoders.llama_shaped(cfg) and a.bias and a.out_bias is False and
            not cfg.mlp.bias):
        return None
    layer_kinds(cfg, "Qwen2")  # masks Qwen2 has no layer type for fail here, by name
    return "qwen2"


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    hf = decoders.hf_config(cfg, "llama")
    del hf["attention_bias"], hf["mlp_bias"]  # not Qwen2 options: its biases are fixed
    kinds, window = layer_kinds(cfg, "Qwen2")
    # layer_types says it all to transformers >= 4.53; older ones read max_window_layers, which
    # matches when the sliding layers are the last ones.
    hf.update(use_sliding_window=window is not None, sliding_window=window, layer_types=kinds,
              max_window_layers=kinds.index(_SLIDING) if window else cfg.num_layers)
    return hf


# -- weights -----------------------------------------------------------------------------------
def entries(model, model_type: str) -> list[Entry]:
    # LLaMA's names; its mapping leaves out o's bias when attention.out_bias is False.
    return decoders.entries(model, "llama")


ignored = decoders.ignored


def prepare(tensors: dict, model_type: str) -> dict:
    return tensors


register_family(__name__)
