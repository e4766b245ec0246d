"""Shared pieces of the Hugging Face mappings: errors, and HF tensor <-> tx parameter entries.

Layouts. HF linear weights are ``[out, in]`` (torch ``nn.Linear``), except GPT-2's ``Conv1D``
which stores ``[in, out]``. tx keeps attention projections per head: ``q [D, N, H]``,
``k/v [D, K, H]``, ``o [N, H, D]``; HF's flattened head axis is head-major (``n * H + h``), so
the mapping is a transpose and a reshape.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import numpy as np
from flax import nnx

from tx.kernels import masks
from tx import flags
from tx.config import EmbedConfig
from tx.registry import Registry

# HF model_type -> the family module that maps it. A family module registers itself, at its
# end, for each model type of its ``ARCHITECTURES`` (``register_family(__name__)``), and has:
#   ARCHITECTURES  {model_type: {HF architecture: tx head class}}
#   config(hf, model_type) -> ModelConfig        config.json straight to values
#   model_type(cfg) -> str | None                 the model type that holds a tx config
#   hf_config(cfg, model_type) -> dict            its config.json fields
#   entries(model, model_type), ignored(cfg, model_type), prepare(tensors, model_type)
#   with_tensors(cfg, tensors) -> ModelConfig     optional: options only the weights reveal
# ``model_type_of`` asks the families in registration order: a family that imports another
# (phi3 imports decoders) registers after it, so a LLaMA-shaped config saves as LLaMA.
FAMILIES = Registry("Hugging Face family", "model_type",
                    register_hint="tx.interop.hf.FAMILIES.register(model_type, module)")


def register_family(module_name: str) -> None:
    """Registers the module ``module_name`` for each model type of its ``ARCHITECTURES``."""
    module = sys.modules[module_name]
    for model_type in module.ARCHITECTURES:
        FAMILIES.register(model_type, module)


def activation_of(cfg) -> str | None:
    """The flag name of the config's MLP activation (None for a function of your own)."""
    found = flags.ACTIVATIONS.spell((cfg.mlp.activation, cfg.mlp.gated))
    return found and found[0]


def hf_activation(table: dict[str, tuple[Callable, bool]], mlp) -> str | None:
    """The first HF name in ``table`` (HF name -> ``(function, gated)``) of ``mlp``'s
    activation; None when the family has no name for it."""
    for name, (fn, gated) in table.items():
        if fn == mlp.activation and gated == mlp.gated:
            return name
    return None


def sliding(window: Any, option: str = "sliding_window") -> masks.Mask:
    """HF's causal window of ``window`` keys (query i sees key j iff ``i - W < j <= i``):
    tx ``Local(W - 1)``."""
    if isinstance(window, float) and window.is_integer():
        window = int(window)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        unsupported(option, window, "give a positive number of keys, or null for none.")
    return masks.Local(window - 1)


def plain_body(cfg) -> bool:
    """No option HF's plain architectures lack: default input embeddings, no MLM transform
    and none of Gemma 2's options (each family checks the rest)."""
    return (cfg.embed == EmbedConfig() and not getattr(cfg.head, "transform", False) and
            no_gemma_options(cfg))


def no_gemma_options(cfg) -> bool:
    """None of the options only the Gemma families (and Qwen3's q/k norms) map: scaled
    embeddings, sandwich or unit-offset norms, q/k norms, soft-capped attention or vocabulary
    logits."""
    norm = cfg.norm
    return (cfg.embed.scale == 1.0 and not cfg.attention.qk_norm and
            not getattr(norm, "sandwich", False) and not getattr(norm, "unit_offset", False) and cfg.attention.score_mod is None and
            getattr(cfg.head, "softcap", None) is None)


def uniform_mask(cfg) -> masks.Mask | None:
    """The one mask every self-attention layer uses, or None for a per-layer schedule."""
    found = set(cfg.attention.masks)
    return found.pop() if len(found) == 1 else None


def unsupported(option: str, value: Any, why: str) -> None:
    raise ValueError(f"unsupported Hugging Face config option {option}={value!r}: {why}")


def check_architecture(hf: dict, model_type: str, known: dict[str, type]) -> type:
    """The tx head class of ``hf['architectures'][0]`` (default: the first known one)."""
    arch = (hf.get("architectures") or [next(iter(known))])[0]
    if arch not in known:
        unsupported("architectures", hf.get("architectures"),
                    f"tx maps {tuple(known)} for {model_type}.")
    return known[arch]


@dataclasses.dataclass
class Entry:
    """One HF tensor <-> one or more tx parameters."""

    key: str
    params: tuple[nnx.Param, ...]
    to_tx: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def one(key, param, to_tx=lambda w: w, to_hf=lambda w: w) -> Entry:
    return Entry(key, (param,), lambda w: (to_tx(w),), to_hf)


def qk_norm_entries(model) -> list[Entry]:
    """Every self-attention layer's per-head q/k norm scales (Qwen3, Gemma 3)."""
    return [one(f"model.layers.{i}.self_attn.{name}_norm.weight",
                getattr(block.self_attn, f"{name}_norm").scale)
            for i, block in enumerate(model.tower.blocks) for name in ("q", "k")]


def unchanged(tensors: dict, model_type: str) -> dict:
    """``prepare`` of a family whose checkpoints need no rewriting."""
    return tensors


def linear(key, param) -> Entry:
    """torch Linear ``[out, in]`` <-> flax Linear kernel ``[in, out]``."""
    return one(key, param, lambda w: w.T, lambda w: w.T)


def dense(prefix: str, layer: nnx.Linear) -> list[Entry]:
    """A torch Linear with bias (``prefix.weight``, ``prefix.bias``) <-> an ``nnx.Linear``."""
    return [linear(prefix + ".weight", layer.kernel), one(prefix + ".bias", layer.bias)]


def norm(prefix: str, module, *, bias: bool = True, weight: str = "weight") -> list[Entry]:
    out = [one(f"{prefix}.{weight}", module.scale)]
    return out + [one(prefix + ".bias", module.bias)] if bias else out


def bert_mlp(prefix: str, block) -> list[Entry]:
    """A BERT-layout block's MLP and its post-norm (``intermediate.dense``, ``output.dense``,
    ``output.LayerNorm``): BERT, FNet and DeBERTa share them."""
    return [*dense(prefix + "intermediate.dense", block.mlp.wi_gate),
            *dense(prefix + "output.dense", block.mlp.wo),
            *norm(prefix + "output.LayerNorm", block.norms[1])]


def bert_mlm_head(head, bias: str = "cls.predictions.bias") -> list[Entry]:
    """BERT's masked-LM transform (dense, LayerNorm) and the output bias (``bias``: where the
    checkpoint keeps it; the output weights are the tied embedding's)."""
    return [*dense("cls.predictions.transform.dense", head.transform.dense),
            *norm("cls.predictions.transform.LayerNorm", head.transform.norm),
            one(bias, head.bias_v)]


def heads_in(key, param, n, h) -> Entry:
    """torch ``[N*H, D]`` (or bias ``[N*H]``) <-> tx ``[D, N, H]`` (or ``[N, H]``)."""
    def to_tx(w):
        return w.reshape(n, h) if w.ndim == 1 else w.T.reshape(-1, n, h)
    return one(key, param, to_tx, lambda w: w.reshape(n * h) if w.ndim == 2 else
               w.reshape(w.shape[0], n * h).T)


def heads_out(key, param, n, h) -> Entry:
    """torch ``[D, N*H]`` <-> tx ``[N, H, D]``."""
    return one(key, param, lambda w: w.T.reshape(n, h, -1), lambda w: w.reshape(n * h, -1).T)


def attention(prefix: str, attn, names: tuple[str, str, str, str], n: int, k: int, h: int, *,
              bias: bool, out_bias: bool | None = None) -> list[Entry]:
    """q/k/v/o projections named ``prefix + names[i] + '.weight'`` (and ``.bias``);
    ``out_bias`` (None: as ``bias``) for o alone, since Qwen2 biases q/k/v but not o."""
    q, kk, v, o = (prefix + name for name in names)
    out = [heads_in(q + ".weight", attn.q_dnh, n, h), heads_in(kk + ".weight", attn.k_dkh, k, h),
           heads_in(v + ".weight", attn.v_dkh, k, h), heads_out(o + ".weight", attn.o_nhd, n, h)]
    if bias:
        out += [heads_in(q + ".bias", attn.q_bias_nh, n, h),
                heads_in(kk + ".bias", attn.k_bias_kh, k, h),
                heads_in(v + ".bias", attn.v_bias_kh, k, h)]
    if bias if out_bias is None else out_bias:
        out.append(one(o + ".bias", attn.o_bias_d))
    return out


# Hugging Face's names of a layer's attention kind (``layer_types``).
FULL, SLIDING = "full_attention", "sliding_attention"


def layer_kinds(cfg, family: str) -> tuple[list[str], int | None]:
    """Each layer's HF attention kind for a tx config, and the one window (in keys) of the
    sliding layers; ``family`` names the model in the errors."""
    kinds, windows = [], set()
    for mask in cfg.attention.layer_masks(cfg.num_layers, masks.Causal()):
        if mask == masks.Causal():
            kinds.append(FULL)
        elif isinstance(mask, masks.Local) and mask.right == 0:
            kinds.append(SLIDING)
            windows.add(mask.left + 1)  # Local(W - 1): W keys
        else:
            unsupported("attention.masks", cfg.attention.masks, f"{family} layers are causal "
                        "or a causal sliding window (masks.Causal(), masks.Local(W - 1)).")
    if len(windows) > 1:
        unsupported("attention.masks", cfg.attention.masks, f"{family} has one sliding_window "
                    f"for every sliding layer, not {sorted(windows)}; use one window size.")
    return kinds, (windows.pop() if windows else None)
