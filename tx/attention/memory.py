"""Segment-level recurrence (Transformer-XL, Dai et al., 2019): attention over a memory.

A layer with a memory attends over ``concat(stop_gradient(memory), x)``: queries come from
this segment's inputs ``x [B, T, D]``, keys and values from the memory (the last ``M`` inputs
this layer saw in earlier segments) followed by ``x``. After the call the memory holds the last
``M`` rows of that concatenation. Recomputing keys and values from the stored hidden states (not
storing K/V) is the paper's choice: the current weights project the memory, and gradients
reach ``W_k``, ``W_v`` through it, never the memory itself.

Positions are local to the call: memory slot ``s`` at ``s``, segment token ``t`` at ``M + t``
(bottom-right aligned, as every mask and backend already assumes), so the distances are the
true ones and no position grows with training. Memory slots not yet filled (the first
segments) are hidden by a segment id. The memory is ``nnx`` state (:class:`Memory`) on the
layer: a training state's ``rest``, carried from step to step and saved with checkpoints.

A pass over segments with memory ``M`` equals one pass over their concatenation under
``kernels.masks.SegmentMemory(segment, M)``, layer by layer (tests/tx/test_xl.py); this holds
for any relative scheme (XL, RoPE, ALiBi, T5, none), and absolute ones are refused (a memory
row's embedded position would be the previous segment's).

The same layer also serves :mod:`tx.attention.xl`, whose q and k are wider than v: values are
zero-padded to the q/k width and the output sliced back, and the scale is ``H ** -0.5`` of the
unwidened head.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tx.attention import cache as cache_lib
from tx.attention import calls, registry
from tx.attention.layer import Attention


class Memory(nnx.Variable):
    """A layer's recurrent memory: hidden states ``[B, M, D]`` or their fill count ``[]``."""


def _rotate_apart(positions, q, k, q_pos, kv_pos):
    """q rotated at ``q_pos`` and k at ``kv_pos`` (``rotate`` takes one set for both)."""
    apart = getattr(positions, "rotate_apart", None)
    if apart is not None:
        return apart(q, k, q_pos, kv_pos)
    q_rot, _ = positions.rotate(q, q[:, :, :1], q_pos)  # k's slot: a one-head stand-in
    _, k_rot = positions.rotate(k, k, kv_pos)
    return q_rot, k_rot


class MemoryAttention(Attention):
    """:class:`tx.attention.Attention` that may attend over a memory (``init_memory``) and
    takes position schemes that widen q and k (``extra_width``: XL)."""

    pageable = False  # the paged manager sizes pages by the K/V projection's head dim

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory: Any = nnx.data(None)  # Memory [B, M, D], set by init_memory
        self.filled: Any = nnx.data(None)  # Memory [] int32: valid rows at the memory's end

    @property
    def extra_width(self) -> int:
        return getattr(self.positions, "extra_width", 0)

    def init_memory(self, batch: int, length: int, *, dtype=None) -> None:
        """An empty memory of ``length`` rows per batch row (``length=0``: none)."""
        if length == 0:
            self.memory, self.filled = nnx.data(None), nnx.data(None)
            return
        d = self.q_dnh[...].shape[0]
        self.memory = Memory(jnp.zeros((batch, length, d), dtype or self.dtype))
        self.filled = Memory(jnp.zeros((), jnp.int32))

    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        if self.memory is not None:
            raise ValueError("init_cache on a layer with a memory: decode with a model "
                             "without one (init_memory(batch, 0)).")
        _, k, h = self.k_dkh[...].shape
        self.cache = nnx.data(cache_lib.make_cache(self.mask, batch, max_len, k,
                                                   h + self.extra_width,
                                                   dtype=dtype or self.dtype, kv=kv))

    def __call__(self, x_btd, positions_bt=None, *, context_bsd=None, segment_ids=None,
                 kv_lengths=None):
        if self.memory is None or context_bsd is not None:
            return super().__call__(x_btd, positions_bt, context_bsd=context_bsd,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths)
        if segment_ids is not None or kv_lengths is not None:
            raise ValueError("segment_ids / kv_lengths given to a layer with a memory: "
                             "recurrence needs contiguous, unpadded rows (row b of a batch "
                             "continues row b of the previous one); turn packing off.")
        return self._project_out(self._attend_memory(x_btd.astype(self.dtype)))

    def _attend_memory(self, x):
        b, t, _ = x.shape
        mem = jax.lax.stop_gradient(self.memory[...]).astype(self.dtype)
        m = mem.shape[1]
        src = jnp.concatenate([mem, x], axis=1)  # [B, M + T, D]
        q, k, v = self.project_qkv(x, src)
        q_pos = jnp.broadcast_to(m + jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_pos = jnp.broadcast_to(jnp.arange(m + t, dtype=jnp.int32), (b, m + t))
        q, k = _rotate_apart(self.positions, q, k, q_pos, kv_pos)
        filled = self.filled[...]
        # Unfilled slots (the first segments) get id 0, which no query has.
        valid = (jnp.arange(m, dtype=jnp.int32) >= m - filled).astype(jnp.int32)
        kv_ids = jnp.concatenate([jnp.broadcast_to(valid, (b, m)),
                                  jnp.ones((b, t), jnp.int32)], axis=1)
        segment_ids = (jnp.ones((b, t), jnp.int32), kv_ids)
        h = v.shape[-1]
        v = self._pad_values(v, q.shape[-1])
        # The default positions of a dense call are these bottom-right aligned ones, where
        # the mask and any score modifier (T5, ALiBi) are evaluated.
        out = registry.serve("dense", calls.Dense(
            q, k, v, mask=self.mask, segment_ids=segment_ids, scale=self._scale(h),
            bias=self.positions.bias(q_pos, kv_pos), score_mod=self.logits_mod()),
            self.implementation)
        self.memory[...] = jax.lax.stop_gradient(src[:, src.shape[1] - m:]).astype(
            self.memory[...].dtype)
        self.filled[...] = jnp.minimum(filled + t, m).astype(jnp.int32)
        return out[..., :h]

    def _scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else head_dim ** -0.5

    @staticmethod
    def _pad_values(v, width: int):
        pad = width - v.shape[-1]
        return v if pad == 0 else jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad)))

    def _attend(self, q_btnh, k_bskh, v_bskh, positions_bt, *, segment_ids, kv_lengths,
                cross: bool):
        h = v_bskh.shape[-1]
        if q_btnh.shape[-1] == h:
            return super()._attend(q_btnh, k_bskh, v_bskh, positions_bt,
                                   segment_ids=segment_ids, kv_lengths=kv_lengths, cross=cross)
        cache = cache_lib.NO_CACHE if self.cache is None else self.cache
        out = cache.attend(q_btnh, k_bskh, self._pad_values(v_bskh, q_btnh.shape[-1]),
                           positions_bt, mask=self.mask, scale=self._scale(h),
                           implementation=self.implementation, positions=self.positions,
                           segment_ids=segment_ids, kv_lengths=kv_lengths, cross=cross,
                           score_mod=self.logits_mod(cross=cross))
        return out[..., :h]


def layers(model: nnx.Module) -> list[MemoryAttention]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, MemoryAttention)]


def init_memory(model: nnx.Module, batch: int, length: int) -> nnx.Module:
    """Gives every self-attention layer of ``model`` an empty memory of ``length`` rows
    (``length=0`` removes it); returns ``model``. The model must have been built with
    ``memory_length`` > 0 (its layers are :class:`MemoryAttention`)."""
    found = layers(model)
    if not found:
        raise ValueError(f"init_memory(length={length}): the model has no layer that takes a "
                         "memory; build it with config.model.memory_length > 0 (or "
                         "positions=xl).")
    for layer in found:
        layer.init_memory(batch, length)
    return model


def cleared(rest):
    """``rest`` (an ``nnx.split`` state) with every memory emptied (rows and fill counts
    zero): evaluation rows do not continue the training rows."""
    return jax.tree.map(lambda v: v.replace(jnp.zeros_like(v[...])) if isinstance(v, Memory)
                        else v, rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
