"""Attention swaps on a built (e.g. loaded) model: the ablation use case.

* ``set_masks``: a different pattern (Local, BigBird, ...) in every self-attention layer, or a
  per-layer schedule; the weights are untouched.
* ``pool_kv_heads``: fewer K/V heads by mean-pooling the K/V projections of each group of heads,
  the GQA paper's checkpoint conversion before uptraining (Ainslie et al., 2023).

Both edit the model in place (NNX attribute assignment), keep ``model.config`` truthful, and
return the model: ``model = pool_kv_heads(hf.load(path), 2)``.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from tx.kernels import masks as masks_lib
from tx import config as config_lib
from tx.models import Tower


def _towers(model) -> list[Tower]:
    """The towers of a tx model (decoder, encoder, or both of a seq2seq), by walking it."""
    found = [node for _, node in nnx.iter_graph(model) if isinstance(node, Tower)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no tower of attention blocks.")
    return found


def set_masks(model: nnx.Module, mask: masks_lib.Mask | Sequence[masks_lib.Mask]
              ) -> nnx.Module:
    """Gives every self-attention layer ``mask`` (or ``mask[i % len(mask)]`` for layer i), in
    place; returns ``model``.

    Drop any decoding cache first: a rolling cache is sized for the mask it was built for.
    """
    schedule = (mask,) if isinstance(mask, masks_lib.Mask) else tuple(mask)
    if not schedule or not all(isinstance(m, masks_lib.Mask) for m in schedule):
        raise ValueError(f"mask={mask!r}: give a kernels.masks.Mask or a non-empty sequence "
                         "of them.")
    for tower in _towers(model):
        for i, attn in enumerate(tower.self_attentions()):
            attn.mask = schedule[i % len(schedule)]
    cfg = model.config
    changes = dict(attention=config_lib.replace(cfg.attention, masks=schedule))
    if hasattr(cfg.head, "masks"):  # an encoder-decoder's decoder schedule
        changes["head"] = config_lib.replace(cfg.head, masks=schedule)
    _set_config(model, config_lib.replace(cfg, **changes))
    return model


def pool_kv_heads(model: nnx.Module, num_kv_heads: int) -> nnx.Module:
    """Mean-pools each self-attention layer's K/V heads down to ``num_kv_heads`` groups of
    consecutive heads (query head n keeps using K/V group ``n // (N / K')``), in place;
    returns ``model``."""
    current = model.config.kv_heads
    if num_kv_heads < 1 or current % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads}: must divide the current number of "
                         f"K/V heads ({current}).")
    ratio = current // num_kv_heads
    for tower in _towers(model):
        for attn in tower.self_attentions():
            if attn.cache is not None:
                raise ValueError("drop the decoding cache (model.drop_cache()) before pooling "
                                 "K/V heads.")
            for name in ("k_dkh", "v_dkh"):
                w = getattr(attn, name)[...]
                d, _, h = w.shape
                getattr(attn, name).set_value(w.reshape(d, num_kv_heads, ratio, h).mean(2))
            for name in ("k_bias_kh", "v_bias_kh"):
                if getattr(attn, name, None) is not None:
                    b = getattr(attn, name)[...]
                    getattr(attn, name).set_value(b.reshape(num_kv_heads, ratio, -1).mean(1))
    cfg = model.config
    _set_config(model, config_lib.replace(
        cfg, attention=config_lib.replace(cfg.attention, num_kv_heads=num_kv_heads)))
    return model


def _set_config(model, cfg) -> None:
    """``model.config`` and the configs its parts carry (seq2seq encoder/decoder)."""
    model.config = cfg
    for _, node in list(nnx.iter_graph(model)):
        if node is not model and hasattr(node, "config"):
            node.config = cfg
