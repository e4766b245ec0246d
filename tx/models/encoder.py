"""Encoder-only models (BERT style): masked LM, sequence and token classification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.config import ModelConfig
from tx.layers import Embed
from tx.models.heads import ClassHead, ClsPooler, vocab_head
from tx.models.tower import Tower


class Encoder(nnx.Module):
    """``tokens [B, T] -> hidden [B, T, D]`` with bidirectional masks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, embed: Embed | None = None):
        self.embed = embed or Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, rngs=rngs)
        self.tower = Tower(cfg, self.embed, cfg.layer_masks(cfg.num_layers, causal=False),
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
        self.head = vocab_head(cfg, self.encoder.embed, rngs=rngs)

    def __call__(self, tokens_bt, **kwargs) -> jax.Array:
        return self.head(self.encoder(tokens_bt, **kwargs))


class TokenClassifier(nnx.Module):
    """``tokens [B, T] -> logits [B, T, C]`` (tagging)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.head = ClassHead(cfg.d_model, cfg.num_classes, use_bias=cfg.head_bias, rngs=rngs)

    def __call__(self, tokens_bt, **kwargs) -> jax.Array:
        return self.head(self.encoder(tokens_bt, **kwargs))


class SequenceClassifier(nnx.Module):
    """``tokens [B, T] -> logits [B, C]``: the mean of the hidden states over valid tokens, or
    (``pooler='cls'``, BERT) ``tanh(dense(h))`` of the first token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler = ClsPooler(cfg.d_model, rngs=rngs) if cfg.pooler == "cls" else None
        self.head = ClassHead(cfg.d_model, cfg.num_classes, use_bias=cfg.head_bias, rngs=rngs)

    def __call__(self, tokens_bt, *, lengths_b=None, **kwargs) -> jax.Array:
        h_btd = self.encoder(tokens_bt, lengths_b=lengths_b, **kwargs).astype(jnp.float32)
        if self.pooler is not None:
            return self.head(self.pooler(h_btd))
        b, t, _ = h_btd.shape
        lengths = jnp.full((b,), t, jnp.int32) if lengths_b is None else lengths_b
        valid_bt = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)
        pooled = (h_btd * valid_bt[:, :, None]).sum(1) / jnp.maximum(valid_bt.sum(1), 1.0)[:, None]
        return self.head(pooled)
