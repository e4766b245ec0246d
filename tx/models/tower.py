"""A stack of blocks over token embeddings: the shared core of every tx model.

``Tower`` turns tokens into hidden states: embedding (plus token-type embeddings and a norm
when configured, as in BERT), absolute positions if configured, ``num_layers`` blocks (each
with its own mask from the per-layer schedule), final norm (pre-norm stacks only).
Relative position modules (RoPE, T5 bias, ALiBi) are created once per tower and shared by
its layers, as in T5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import masks as masks_lib
from tx.attention import Attention
from tx.config import ModelConfig
from tx.layers import (MLP, ALiBi, Embed, LearnedPositions, RoPE, T5RelativeBias, make_norm,
                       sinusoidal)
from tx.layers.block import Block


def _relative_positions(cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
    """(rope, bias) modules for the self-attention of one tower."""
    if cfg.positions == "rope":
        return RoPE(cfg.head_size, base=cfg.rope_base, scaling=cfg.rope_scaling), None
    if cfg.positions == "t5":
        return None, T5RelativeBias(cfg.num_heads, bidirectional=not causal, rngs=rngs)
    if cfg.positions == "alibi":
        return None, ALiBi(cfg.num_heads)
    return None, None


def make_attention(cfg: ModelConfig, mask: masks_lib.Mask, *, rope=None, bias=None,
                   rngs: nnx.Rngs) -> Attention:
    return Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, mask=mask,
                     implementation=cfg.implementation, rope=rope, bias=bias,
                     use_bias=cfg.attention_bias, scale=cfg.attention_scale,
                     dtype=cfg.jnp_dtype, rngs=rngs)


class Tower(nnx.Module):
    """Embedding + blocks + final norm; ``cross=True`` adds cross-attention to every block."""

    def __init__(self, cfg: ModelConfig, embed: Embed, layer_masks: tuple[masks_lib.Mask, ...],
                 *, causal: bool, cross: bool = False, rngs: nnx.Rngs):
        self.embed = embed
        self.absolute = cfg.positions
        self.learned = LearnedPositions(cfg.max_len, cfg.d_model, dtype=cfg.jnp_dtype,
                                        rngs=rngs) if cfg.positions == "learned" else None
        self.token_types = Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.jnp_dtype,
                                 rngs=rngs) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.jnp_dtype,
                                    rngs=rngs) if cfg.embed_norm else None
        rope, bias = _relative_positions(cfg, causal=causal, rngs=rngs)
        blocks = []
        for mask in layer_masks:
            cross_attn = make_attention(cfg, masks_lib.Full(), rngs=rngs) if cross else None
            mlp = MLP(cfg.d_model, cfg.d_ff, activation=cfg.activation,
                      dropout_rate=cfg.dropout_rate, use_bias=cfg.mlp_bias,
                      dtype=cfg.jnp_dtype, rngs=rngs)
            blocks.append(Block(make_attention(cfg, mask, rope=rope, bias=bias, rngs=rngs), mlp,
                                d_model=cfg.d_model, cross_attn=cross_attn, norm=cfg.norm,
                                pre_norm=cfg.pre_norm, dropout_rate=cfg.dropout_rate,
                                dtype=cfg.jnp_dtype, norm_eps=cfg.norm_eps, rngs=rngs))
        self.blocks = nnx.List(blocks)
        # Pre-norm stacks end un-normalised; post-norm blocks already end in a norm.
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.jnp_dtype,
                                    rngs=rngs) \
            if cfg.pre_norm else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        self.dtype = cfg.jnp_dtype

    def start(self) -> jax.Array | int:
        """Tokens already in the decoding cache (0 when not decoding)."""
        cache = self.blocks[0].self_attn.cache
        return 0 if cache is None else cache.index[...]

    def init_cache(self, batch: int, max_len: int) -> None:
        for block in self.blocks:
            block.self_attn.init_cache(batch, max_len)

    def drop_cache(self) -> None:
        for block in self.blocks:
            block.self_attn.cache = None

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None, *,
                 segment_ids_bt=None, lengths_b=None, context_bsd=None,
                 context_segment_ids_bs=None, context_lengths_b=None,
                 token_types_bt=None) -> jax.Array:
        """``token_types_bt`` (BERT's sentence A/B ids) default to type 0."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(self.start() + jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens_bt).astype(self.dtype)
        if self.token_types is not None:
            if token_types_bt is None:
                token_types_bt = jnp.zeros((b, t), jnp.int32)
            x = x + self.token_types(token_types_bt)
        elif token_types_bt is not None:
            raise ValueError("token_types_bt given, but the model has no token-type embeddings "
                             "(type_vocab_size=0); set type_vocab_size in the config.")
        if self.absolute == "sinusoidal":  # Vaswani et al.: scale tokens up to the sines' size
            x = x * math.sqrt(x.shape[-1]) + sinusoidal(positions_bt, x.shape[-1]).astype(x.dtype)
        elif self.learned is not None:
            x = x + self.learned(positions_bt)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        segment_ids = None if segment_ids_bt is None else (segment_ids_bt, segment_ids_bt)
        for block in self.blocks:
            x = block(x, positions_bt, segment_ids=segment_ids, kv_lengths=lengths_b,
                      context_bsd=context_bsd, context_segment_ids=context_segment_ids_bs,
                      context_lengths=context_lengths_b)
        return x if self.final_norm is None else self.final_norm(x)
