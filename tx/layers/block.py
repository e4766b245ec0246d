"""A transformer block: self-attention, optional cross-attention, MLP; pre-, post- or sandwich
norms.

The block is built from its sub-modules (the model decides which attention, mask and MLP), so
its constructor stays small and a variant never becomes a flag threaded through ``__call__``.
"""

from __future__ import annotations

import jax
from flax import nnx

from tx.layers.norms import RMSNorm


class Block(nnx.Module):
    """``x + f(norm(x))`` for each sub-layer (pre-norm), ``norm(x + f(x))`` (post-norm) or
    ``x + out_norm(f(norm(x)))`` (sandwich, Gemma 2)."""

    def __init__(self, self_attn: nnx.Module, mlp: nnx.Module, *, d_model: int,
                 cross_attn: nnx.Module | None = None, norm=RMSNorm(),
                 dropout_rate: float = 0.0, dtype=None, rngs: nnx.Rngs):
        """``norm`` is a norm value (``RMSNorm(eps, pre, sandwich)`` / ``LayerNorm(...)``)."""
        self.self_attn, self.cross_attn, self.mlp = self_attn, cross_attn, mlp
        num_norms = 3 if cross_attn is not None else 2

        def build_norms():
            return nnx.List([norm.build(d_model, dtype=dtype, rngs=rngs)
                             for _ in range(num_norms)])
        self.norms = build_norms()
        # A separate list (None otherwise), so pre- and post-norm blocks keep the parameter
        # names their checkpoints were saved under.
        self.out_norms = build_norms() if getattr(norm, "sandwich", False) else None
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.pre_norm = norm.pre

    def _residual(self, x, i, fn):
        if not self.pre_norm:
            return self.norms[i](x + self.dropout(fn(x)))
        h = fn(self.norms[i](x))
        if self.out_norms is not None:
            h = self.out_norms[i](h)
        return x + self.dropout(h)

    def __call__(self, x_btd: jax.Array, positions_bt=None, *, segment_ids=None,
                 kv_lengths=None, context_bsd=None, context_segment_ids=None,
                 context_lengths=None) -> jax.Array:
        x = self._residual(x_btd, 0, lambda h: self.self_attn(
            h, positions_bt, segment_ids=segment_ids, kv_lengths=kv_lengths))
        if self.cross_attn is not None:
            cross_ids = None if context_segment_ids is None else (segment_ids[0],
                                                                  context_segment_ids)
            x = self._residual(x, 1, lambda h: self.cross_attn(
                h, context_bsd=context_bsd, segment_ids=cross_ids, kv_lengths=context_lengths))
        return self._residual(x, len(self.norms) - 1, self.mlp)
