"""Encoder-decoder seq2seq model (original Transformer / T5 style)."""

from __future__ import annotations

import jax
from flax import nnx

from tx.kernels.masks import Causal
from tx.config import ModelConfig
from tx.layers import Embed
from tx.models.encoder import Encoder
from tx.models.tower import Tower


class Seq2Seq(nnx.Module):
    """``(source [B, S], target_in [B, T]) -> logits [B, T, V]``.

    Source and target share one embedding table (T5). The decoder's blocks self-attend
    causally and cross-attend to the whole (unpadded) encoder output.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs, embed=embed)
        self.decoder = Tower(cfg, embed, cfg.head.decoder_layer_masks(cfg, Causal()), causal=True,
                             cross=True, rngs=rngs)
        self.head = cfg.head.output(cfg, embed, rngs=rngs)

    def encode(self, source_bs, *, source_lengths_b=None, source_segment_ids_bs=None,
               source_positions_bs=None) -> jax.Array:
        return self.encoder(source_bs, positions_bt=source_positions_bs,
                            segment_ids_bt=source_segment_ids_bs, lengths_b=source_lengths_b)

    def decode(self, target_bt, encoded_bsd, *, source_lengths_b=None, positions_bt=None,
               segment_ids_bt=None, source_segment_ids_bs=None) -> jax.Array:
        x = self.decoder(target_bt, positions_bt, segment_ids_bt=segment_ids_bt,
                         context_bsd=encoded_bsd, context_segment_ids_bs=source_segment_ids_bs,
                         context_lengths_b=source_lengths_b)
        return self.head(x)

    def __call__(self, source_bs, target_bt, *, source_lengths_b=None, source_segment_ids_bs=None,
                 source_positions_bs=None, segment_ids_bt=None, positions_bt=None) -> jax.Array:
        encoded = self.encode(source_bs, source_lengths_b=source_lengths_b,
                              source_segment_ids_bs=source_segment_ids_bs,
                              source_positions_bs=source_positions_bs)
        return self.decode(target_bt, encoded, source_lengths_b=source_lengths_b,
                           positions_bt=positions_bt, segment_ids_bt=segment_ids_bt,
                           source_segment_ids_bs=source_segment_ids_bs)

    def init_cache(self, batch: int, max_len: int, *, kv=None) -> None:
        self.decoder.init_cache(batch, max_len, kv=kv)

    def drop_cache(self) -> None:
        self.decoder.drop_cache()
