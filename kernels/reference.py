"""Plain ``jnp`` attention: the reference every kernel is checked against, and the ``xla``
implementation of the attention layer.

GQA/MQA use the grouped einsum ``BTKGH,BSKH->BKGTS``: the ``G = N / K`` query heads of a group
meet their shared K/V head inside the contraction, so K/V are never repeated in memory.
Logits and softmax are fp32 whatever the input dtype. A query that sees no key returns exact
zeros, and (because the zeros come from a ``where`` after the softmax) zero gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kernels import checks
from kernels import masks as masks_lib


def visibility(mask: masks_lib.Mask, b: int, t: int, s: int, *, segment_ids=None,
               kv_lengths=None, q_positions=None, kv_positions=None) -> jax.Array:
    """``[B, T, S]`` bool: the mask at the given positions, narrowed by the data.

    Positions default to bottom-right alignment. ``kv_positions < 0`` marks empty slots (an
    unfilled cache), which nobody sees.
    """
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_pos, kv_pos = q_positions[:, :, None], kv_positions[:, None, :]
    visible = jnp.broadcast_to(mask.predicate(q_pos, kv_pos, s), (b, t, s)) & (kv_pos >= 0)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        visible &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_lengths is not None:
        visible &= jnp.arange(s, dtype=jnp.int32)[None, None, :] < kv_lengths[:, None, None]
    return visible


def _masked_logits(q, k, mask, segment_ids, kv_lengths, scale, bias, q_positions,
                   kv_positions):
    """Checks the arguments; returns fp32 logits ``[B,K,G,T,S]`` with hidden pairs at the
    fp32 minimum (finite, so fully hidden rows stay NaN-free) and visibility ``[B,T,S]``."""
    b, t, s, n, kh, h = checks.check_qkv(q, k, k)
    mask = checks.check_mask(mask)
    checks.check_segment_ids(segment_ids, b, t, s)
    checks.check_kv_lengths(kv_lengths, b)
    checks.check_positions("q_positions", q_positions, b, t)
    checks.check_positions("kv_positions", kv_positions, b, s)
    checks.check_bias(bias, b, t, s, n)
    g = n // kh
    scale = h ** -0.5 if scale is None else scale
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(b, t, kh, g, h), k,
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
        groups = (1, 1) if bias.shape[1] == 1 else (kh, g)
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], *groups, t, s)
    visible_bts = visibility(mask, b, t, s, segment_ids=segment_ids, kv_lengths=kv_lengths,
                             q_positions=q_positions, kv_positions=kv_positions)
    logits = jnp.where(visible_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    return logits, visible_bts


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks_lib.Mask | None = None,
              segment_ids: tuple[jax.Array, jax.Array] | None = None,
              kv_lengths: jax.Array | None = None, scale: float | None = None,
              bias: jax.Array | None = None, q_positions: jax.Array | None = None,
              kv_positions: jax.Array | None = None) -> jax.Array:
    """Dot-product attention, q ``[B,T,N,H]``, k/v ``[B,S,K,H]`` -> ``[B,T,N,H]``.

    Args:
      mask: a ``kernels.masks.Mask`` (``None`` means ``Full()``).
      segment_ids: ``(q_segment_ids [B,T], kv_segment_ids [B,S])``; equal ids attend (packing).
      kv_lengths: ``[B]`` int32; keys at or past the length are padding.
      scale: logit scale, default ``H ** -0.5``.
      bias: additive fp32 logits bias ``[B|1, N|1, T, S]`` (T5 relative bias, ALiBi).
      q_positions, kv_positions: ``[B,T]`` / ``[B,S]`` int32 positions at which the mask is
        evaluated (incremental decoding, rolling caches); default bottom-right aligned.
    """
    checks.check_qkv(q, k, v)
    logits, visible_bts = _masked_logits(q, k, mask, segment_ids, kv_lengths, scale, bias,
                                         q_positions, kv_positions)
    # Zeroing hidden pairs after the softmax keeps a -inf bias from pushing weight onto them.
    probs = jnp.where(visible_bts[:, None, None], jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = jnp.where(visible_bts.any(axis=-1)[:, :, None, None, None], out, 0.0)
    return out.reshape(q.shape).astype(q.dtype)


def attention_weights(q: jax.Array, k: jax.Array, *, mask: Any = None, segment_ids=None,
                      kv_lengths=None, scale=None, bias=None, q_positions=None,
                      kv_positions=None) -> jax.Array:
    """The ``[B, N, T, S]`` fp32 softmax weights (for visualisation); hidden rows are zero."""
    logits, visible_bts = _masked_logits(q, k, mask, segment_ids, kv_lengths, scale, bias,
                                         q_positions, kv_positions)
    b, kh, g, t, s = logits.shape
    probs = jnp.where(visible_bts[:, None, None], jax.nn.softmax(logits, axis=-1), 0.0)
    return probs.reshape(b, kh * g, t, s)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    mask: masks_lib.Mask | None = None,
                    scale: float | None = None) -> jax.Array:
    """Reference for ``kernels.paged_attention``: gather each sequence's pages into contiguous
    K/V ``[B, max_pages * L, K, H]``, then ``attention`` with the new tokens at positions
    ``lengths - T .. lengths - 1`` and keys past ``lengths`` as padding.

    q is ``[B, N, H]`` or ``[B, T, N, H]``; k_pages/v_pages ``[P, L, K, H]``; block_tables
    ``[B, max_pages]`` int32; lengths ``[B]`` int32 (new tokens included).

    A page id outside ``[0, P)`` reads as an empty page (its keys hidden, as if past the
    length), as in the kernel: gathering it would clamp or wrap onto another sequence's page.
    """
    squeeze = q.ndim == 3
    q_btnh = q[:, None] if squeeze else q
    b, t = q_btnh.shape[:2]
    p, page, kh, h = k_pages.shape
    s = block_tables.shape[1] * page
    tables = block_tables.astype(jnp.int32)
    real = (tables >= 0) & (tables < p)                                   # [B, max_pages]
    tables = jnp.where(real, tables, 0)
    k = k_pages[tables].reshape(b, s, kh, h)  # [B, max_pages, L, K, H] -> [B, S, K, H]
    real_bs = jnp.repeat(real, page, axis=1)                              # [B, S]
    # Zeroed values keep an empty page's contents (even NaN) out of the weighted sum.
    v = jnp.where(real_bs[:, :, None, None], v_pages[tables].reshape(b, s, kh, h), 0)
    kv_positions = jnp.where(real_bs, jnp.arange(s, dtype=jnp.int32)[None, :], -1)  # -1: empty
    lengths = lengths.astype(jnp.int32)
    q_positions = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    out = attention(q_btnh, k, v, mask=mask, kv_lengths=lengths, scale=scale,
                    q_positions=q_positions, kv_positions=kv_positions)
    return out[:, 0] if squeeze else out
