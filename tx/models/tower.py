"""A stack of blocks over token embeddings: the shared core of every tx model.

``Tower`` turns tokens into hidden states: embedding (scaled when configured, as in Gemma;
plus token-type embeddings and a norm when configured, as in BERT), the position module's
``embed`` hook (absolute positions), the blocks (each with its own mask from the per-layer
schedule), final norm (pre-norm stacks only).
The position module is built once per tower from ``config.positions`` and shared by its
self-attention layers (T5 shares its bias table the same way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.kernels import masks as masks_lib
from tx.attention import Attention
from tx.attention.memory import MemoryAttention
from tx.config import ModelConfig
from tx.layers import Embed
from tx.layers.block import Block


def make_attention(cfg: ModelConfig, mask: masks_lib.Mask, *, positions=None,
                   rngs: nnx.Rngs, layer: int = 0) -> Attention:
    """Softmax attention under ``mask``, or the layer a schedule value builds itself
    (``build_attention``: e.g. FAVOR+)."""
    build = getattr(mask, "build_attention", None)
    memory = getattr(cfg, "memory_length", 0)
    if build is not None and memory:
        raise ValueError(f"memory_length={memory}: layer {layer} is {mask!r}, which builds its "
                         "own layer and takes no memory; use softmax patterns with a memory.")
    if build is not None:
        return build(cfg, layer=layer, positions=positions, rngs=rngs)
    a = cfg.attention
    # A memory, or positions that widen q and k (XL), need the layer that handles them.
    cls = MemoryAttention if memory or getattr(positions, "extra_width", 0) else Attention
    return cls(cfg.d_model, a.num_heads, a.kv_heads, cfg.head_dim, mask=mask,
               implementation=a.implementation, positions=positions, use_bias=a.bias,
               out_bias=a.out_bias, scale=a.scale, score_mod=a.score_mod,
               sinks=a.sinks, qk_norm=cfg.norm if a.qk_norm else None, dtype=cfg.dtype,
               rngs=rngs)


class Tower(nnx.Module):
    """Embedding + blocks + final norm; ``cross=True`` adds cross-attention to every block."""

    def __init__(self, cfg: ModelConfig, embed: Embed, layer_masks: tuple[masks_lib.Mask, ...],
                 *, causal: bool, cross: bool = False, rngs: nnx.Rngs):
        self.embed = embed
        self.embed_scale = cfg.embed.scale
        self.positions = cfg.positions.build(cfg, causal=causal, rngs=rngs)
        self.token_types = Embed(cfg.embed.type_vocab_size, cfg.d_model, dtype=cfg.dtype,
                                 rngs=rngs) if cfg.embed.type_vocab_size else None
        self.embed_norm = cfg.norm.build(cfg.d_model, dtype=cfg.dtype, rngs=rngs) \
            if cfg.embed.norm else None
        blocks = []
        for i, mask in enumerate(layer_masks):
            cross_attn = make_attention(cfg, masks_lib.Full(), rngs=rngs) if cross else None
            mlp = cfg.mlp.build(cfg.d_model, dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                                rngs=rngs)
            attn = make_attention(cfg, mask, positions=self._layer_positions(i), rngs=rngs,
                                  layer=i)
            blocks.append(Block(attn, mlp, d_model=cfg.d_model, cross_attn=cross_attn,
                                norm=cfg.norm, dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                                rngs=rngs))
        self.blocks = nnx.List(blocks)
        # Pre-norm stacks end un-normalised; post-norm blocks already end in a norm.
        self.final_norm = cfg.norm.build(cfg.d_model, dtype=cfg.dtype, rngs=rngs) \
            if cfg.norm.pre else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        self.dtype = cfg.dtype

    def _layer_positions(self, i: int):
        """Layer ``i``'s position module: the tower's, or its per-layer one when the scheme
        has some (``layer(i)``: e.g. ``tx.layers.positions.LayerRoPE``, Gemma 3)."""
        layer = getattr(self.positions, "layer", None)
        return self.positions if layer is None else layer(i)

    def self_attentions(self) -> list[Attention]:
        """The self-attention layers, in layer order (found by walking the graph, so wrapped
        blocks, e.g. rematerialised ones, are found too)."""
        return [node.self_attn for _, node in nnx.iter_graph(self) if isinstance(node, Block)]

    def start(self) -> jax.Array | int:
        """Tokens already in the decoding cache (0 when not decoding)."""
        cache = self.self_attentions()[0].cache
        return 0 if cache is None else cache.start()

    def init_cache(self, batch: int, max_len: int, *, kv=None) -> None:
        for attn in self.self_attentions():
            attn.init_cache(batch, max_len, kv=kv)

    def drop_cache(self) -> None:
        for attn in self.self_attentions():
            attn.cache = None

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None, *,
                 segment_ids_bt=None, lengths_b=None, context_bsd=None,
                 context_segment_ids_bs=None, context_lengths_b=None,
                 token_types_bt=None) -> jax.Array:
        """``token_types_bt`` (BERT's sentence A/B ids) default to type 0."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(self.start() + jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens_bt).astype(self.dtype)
        if self.embed_scale != 1.0:  # in the compute dtype, as Gemma rounds sqrt(d_model)
            x = x * jnp.asarray(self.embed_scale, self.dtype)
        if self.token_types is not None:
            if token_types_bt is None:
                token_types_bt = jnp.zeros((b, t), jnp.int32)
            x = x + self.token_types(token_types_bt)
        elif token_types_bt is not None:
            raise ValueError("token_types_bt given, but the model has no token-type embeddings "
                             "(embed.type_vocab_size=0); set it in the config.")
        x = self.positions.embed(x, positions_bt)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        segment_ids = None if segment_ids_bt is None else (segment_ids_bt, segment_ids_bt)
        for block in self.blocks:
            x = block(x, positions_bt, segment_ids=segment_ids, kv_lengths=lengths_b,
                      context_bsd=context_bsd, context_segment_ids=context_segment_ids_bs,
                      context_lengths=context_lengths_b)
        return x if self.final_norm is None else self.final_norm(x)
