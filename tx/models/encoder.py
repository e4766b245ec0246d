"""Encoder-only models (BERT style): masked LM, sequence and token classification."""

from __future__ import annotations

import jax
from flax import nnx

from tx.kernels.masks import Full
from tx.config import ModelConfig
from tx.layers import Embed
from tx.models.outputs import ClassHead
from tx.models.tower import Tower


class Encoder(nnx.Module):
    """``tokens [B, T] -> hidden [B, T, D]`` with bidirectional masks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, embed: Embed | None = None):
        self.embed = embed or Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.tower = Tower(cfg, self.embed, cfg.attention.layer_masks(cfg.num_layers, Full()),
                           causal=False, rngs=rngs)

    def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, lengths_b=None,
                 token_types_bt=None):
        return self.tower(tokens_bt, positions_bt, segment_ids_bt=segment_ids_bt,
                          lengths_b=lengths_b, token_types_bt=token_types_bt)


class MaskedLM(nnx.Module):
    """``tokens [B, T] -> logits [B, T, V]``: predicts the tokens hidden by the corruption."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.head = cfg.head.output(cfg, self.encoder.embed, rngs=rngs)

    def __call__(self, tokens_bt, **kwargs) -> jax.Array:
        return self.head(self.encoder(tokens_bt, **kwargs))


class TokenClassifier(nnx.Module):
    """``tokens [B, T] -> logits [B, T, C]`` (tagging)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.head = ClassHead(cfg.d_model, cfg.head.num_classes, use_bias=cfg.head.bias,
                              rngs=rngs)

    def __call__(self, tokens_bt, **kwargs) -> jax.Array:
        return self.head(self.encoder(tokens_bt, **kwargs))


class SequenceClassifier(nnx.Module):
    """``tokens [B, T] -> logits [B, C]`` from a pooled hidden state: the mean over valid
    tokens (``MeanPool()``) or BERT's ``tanh(dense(h))`` of the first token (``ClsPool()``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler = cfg.head.pooler.build(cfg.d_model, rngs=rngs)
        self.head = ClassHead(cfg.d_model, cfg.head.num_classes, use_bias=cfg.head.bias,
                              rngs=rngs)

    def __call__(self, tokens_bt, *, lengths_b=None, **kwargs) -> jax.Array:
        h_btd = self.encoder(tokens_bt, lengths_b=lengths_b, **kwargs)
        return self.head(self.pooler(h_btd, lengths_b))
