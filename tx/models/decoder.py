"""Decoder-only language model (GPT / LLaMA / Mistral style)."""

from __future__ import annotations

import jax
from flax import nnx

from tx.kernels.masks import Causal
from tx.config import ModelConfig
from tx.layers import Embed
from tx.models.tower import Tower


class DecoderLM(nnx.Module):
    """``tokens [B, T] -> logits [B, T, V]`` (fp32), causal self-attention in every layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.tower = Tower(cfg, embed, cfg.attention.layer_masks(cfg.num_layers, Causal()),
                           causal=True, rngs=rngs)
        self.head = cfg.head.output(cfg, embed, rngs=rngs)

    def __call__(self, tokens_bt: jax.Array, *, positions_bt=None, segment_ids_bt=None,
                 lengths_b=None) -> jax.Array:
        """``segment_ids_bt`` packs documents (no attention across them); restart
        ``positions_bt`` per document with it."""
        x = self.tower(tokens_bt, positions_bt, segment_ids_bt=segment_ids_bt,
                       lengths_b=lengths_b)
        return self.head(x)

    def init_cache(self, batch: int, max_len: int, *, kv=None) -> None:
        """Switches to incremental decoding: later calls append to a KV cache (quantised by
        ``kv``, a ``tx.attention.quant.KVQuant``; None: the compute dtype)."""
        self.tower.init_cache(batch, max_len, kv=kv)

    def drop_cache(self) -> None:
        self.tower.drop_cache()
