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
import numpy as np

from tx.kernels import checks
from tx.kernels import masks as masks_lib
from tx.kernels import row_tables, score_mods


# The xla path attends one block of queries at a time, so that a block's fp32 logits
# ``[B, N, block_q, S]`` stay near the CPU's cache (one 16 MiB logits tensor of a 256-token batch
# streams through memory at every elementwise pass) and, when the mask is known at trace time
# (default positions), cover only the keys its rows can see: causal and local masks skip the
# tiles past the diagonal, forward and backward. The blocks are unrolled, so their count is
# capped; one block (short sequences, decode steps) is the plain dense computation.
_BLOCK_LOGITS_BYTES = 2 << 20
_MAX_Q_BLOCKS = 16
_KEY_ALIGN = 16  # key ranges start and end on multiples of this (or at S)


def _default_positions(b, t, s, q_positions, kv_positions):
    """The given positions, or the bottom-right aligned ones: ``[B, T]`` and ``[B, S]``."""
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return q_positions, kv_positions


def visibility(mask: masks_lib.Mask, b: int, t: int, s: int, *, segment_ids=None,
               kv_lengths=None, q_positions=None, kv_positions=None,
               kv_len: int | None = None) -> jax.Array:
    """``[B, T, S]`` bool: the mask at the given positions, narrowed by the data.

    Positions default to bottom-right alignment. ``kv_positions < 0`` marks empty slots (an
    unfilled cache), which nobody sees. ``kv_len`` is the key count the mask is evaluated for
    (default ``s``; a block of keys passes the whole length).
    """
    q_positions, kv_positions = _default_positions(b, t, s, q_positions, kv_positions)
    q_pos, kv_pos = q_positions[:, :, None], kv_positions[:, None, :]
    kv_len = s if kv_len is None else kv_len
    visible = jnp.broadcast_to(mask.predicate(q_pos, kv_pos, kv_len), (b, t, s)) & (kv_pos >= 0)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        visible &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_lengths is not None:
        visible &= jnp.arange(s, dtype=jnp.int32)[None, None, :] < kv_lengths[:, None, None]
    return visible


def _check(q, k, mask, segment_ids, kv_lengths, bias, q_positions, kv_positions,
           score_mod=None):
    b, t, s, n, kh, h = checks.check_qkv(q, k, k)
    score_mods.check(score_mod, n)
    mask = checks.check_mask(mask)
    checks.check_segment_ids(segment_ids, b, t, s)
    checks.check_kv_lengths(kv_lengths, b)
    checks.check_positions("q_positions", q_positions, b, t)
    checks.check_positions("kv_positions", kv_positions, b, s)
    checks.check_bias(bias, b, t, s, n)
    row_tables.check_call(score_mod, b, t, s,
                          positions=q_positions is not None or kv_positions is not None)
    return mask


def _modified(score_mod, logits, q_positions, kv_positions):
    """The score modifier applied to logits ``[B,K,G,T,S]`` at the given positions."""
    b, kh, g, t, s = logits.shape
    q_positions, kv_positions = _default_positions(b, t, s, q_positions, kv_positions)
    head = jnp.arange(kh * g, dtype=jnp.int32).reshape(1, kh, g, 1, 1)
    batch = jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1, 1)
    return score_mods.reference_logits(
        score_mod, logits, head=head, batch=batch, num_heads=kh * g,
        q_pos=q_positions.astype(jnp.int32)[:, None, None, :, None],
        kv_pos=kv_positions.astype(jnp.int32)[:, None, None, None, :])


def _softmax(logits, score_mod):
    """Softmax over keys; a sink logit (``Sinks``) joins the denominator with no value."""
    sink = None if score_mod is None else score_mod.sink()
    if sink is None:
        return jax.nn.softmax(logits, axis=-1)
    b, kh, g = logits.shape[:3]
    sink = sink.reshape(1, kh, g, 1, 1)
    # A constant shift (its gradient cancels); differentiating the max through masked -inf
    # logits gives NaN where XLA does not simplify it (--xla_backend_optimization_level=0).
    m = jax.lax.stop_gradient(jnp.maximum(logits.max(axis=-1, keepdims=True), sink))
    e = jnp.exp(logits - m)
    return e / (e.sum(axis=-1, keepdims=True) + jnp.exp(sink - m))


def _logits(q, k, kv_major: bool):
    """fp32 ``q k^T`` as ``[B,K,G,T,S]`` for keys ``[B,S,K,H]`` or (``kv_major``) ``[K,B,S,H]``.

    K-major keys come from a paged pool's whole pages. K and B then lead every operand, so
    XLA's dot takes them as its batch dims as they lie; a ``[B,K,...]`` order would make it
    transpose the keys first, one more pass over them than a contiguous cache pays."""
    b, t, n, h = q.shape
    kh = k.shape[0 if kv_major else 2]
    q = q.reshape(b, t, kh, n // kh, h)
    if not kv_major:
        return jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = jnp.einsum("KBTGH,KBSH->KBTGS", q.transpose(2, 0, 1, 3, 4), k,
                        preferred_element_type=jnp.float32)
    return logits.transpose(1, 0, 3, 2, 4)


def _weighted_values(probs, v, kv_major: bool):
    """``probs [B,K,G,T,S] @ v`` as fp32 ``[B,T,K,G,H]``, v laid out as in ``_logits``."""
    probs = probs.astype(v.dtype)
    if not kv_major:
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    out = jnp.einsum("KBTGS,KBSH->KBTGH", probs.transpose(1, 0, 3, 2, 4), v,
                     preferred_element_type=jnp.float32)
    return out.transpose(1, 2, 0, 3, 4)


def _masked_logits(q, k, mask, segment_ids, kv_lengths, scale, bias, q_positions,
                   kv_positions, kv_len=None, score_mod=None, kv_major=False):
    """fp32 logits ``[B,K,G,T,S]`` with hidden pairs at the fp32 minimum (finite, so fully
    hidden rows stay NaN-free) and visibility ``[B,T,S]``; arguments already checked."""
    b, t, n, h = q.shape
    s, kh = (k.shape[2], k.shape[0]) if kv_major else k.shape[1:3]
    g = n // kh
    scale = h ** -0.5 if scale is None else scale
    logits = _logits(q, k, kv_major) * scale
    if bias is not None:
        groups = (1, 1) if bias.shape[1] == 1 else (kh, g)
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], *groups, t, s)
    if score_mod is not None:
        logits = _modified(score_mod, logits, q_positions, kv_positions)
    visible_bts = visibility(mask, b, t, s, segment_ids=segment_ids, kv_lengths=kv_lengths,
                             q_positions=q_positions, kv_positions=kv_positions, kv_len=kv_len)
    logits = jnp.where(visible_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    return logits, visible_bts


def _dense_attention(q, k, v, mask, segment_ids, kv_lengths, scale, bias, q_positions,
                     kv_positions, kv_len=None, score_mod=None, kv_major=False):
    """Softmax attention over every key given, as ``[B,T,N,H]`` fp32."""
    logits, visible_bts = _masked_logits(q, k, mask, segment_ids, kv_lengths, scale, bias,
                                         q_positions, kv_positions, kv_len, score_mod,
                                         kv_major)
    # Zeroing hidden pairs after the softmax keeps a -inf bias from pushing weight onto them.
    probs = jnp.where(visible_bts[:, None, None], _softmax(logits, score_mod), 0.0)
    out = _weighted_values(probs, v, kv_major)
    out = jnp.where(visible_bts.any(axis=-1)[:, :, None, None, None], out, 0.0)
    return out.reshape(*q.shape[:3], v.shape[-1])


def query_blocks(mask: masks_lib.Mask, b: int, t: int, s: int, n: int, *, aligned: bool,
                 block_q: int | None = None) -> tuple[tuple[int, int, int, int], ...]:
    """``(q0, q1, k0, k1)`` per block of queries: rows ``q0:q1`` attend over keys ``k0:k1``.

    ``block_q`` defaults to the rows whose logits fit ``_BLOCK_LOGITS_BYTES`` (at least
    ``T / _MAX_Q_BLOCKS``). When ``aligned`` (default positions) the key range is the span of
    the mask's non-empty tiles for those rows (empty when they see no key at all); otherwise
    every key.
    """
    if block_q is None:
        rows = _BLOCK_LOGITS_BYTES // max(1, b * n * s * 4)
        block_q = max(rows, -(-t // _MAX_Q_BLOCKS), 1)
    block_q = min(block_q, t)
    tiles = mask.tile_map(t, s, block_q, _KEY_ALIGN) if aligned else None
    out = []
    for i, q0 in enumerate(range(0, t, block_q)):
        k0, k1 = 0, s
        if tiles is not None:
            seen = np.flatnonzero(tiles[i] != masks_lib.EMPTY)
            k0, k1 = (0, 0) if not seen.size else \
                (int(seen[0]) * _KEY_ALIGN, min(s, (int(seen[-1]) + 1) * _KEY_ALIGN))
        out.append((q0, min(t, q0 + block_q), k0, k1))
    return tuple(out)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks_lib.Mask | None = None,
              segment_ids: tuple[jax.Array, jax.Array] | None = None,
              kv_lengths: jax.Array | None = None, scale: float | None = None,
              bias: jax.Array | None = None, q_positions: jax.Array | None = None,
              kv_positions: jax.Array | None = None, block_q: int | None = None,
              score_mod: score_mods.ScoreMod | None = None) -> jax.Array:
    """Dot-product attention, q ``[B,T,N,H]``, k ``[B,S,K,H]``, v ``[B,S,K,Hv]`` ->
    ``[B,T,N,Hv]`` (``Hv`` may differ from ``H``).

    Args:
      mask: a ``kernels.masks.Mask`` (``None`` means ``Full()``).
      segment_ids: ``(q_segment_ids [B,T], kv_segment_ids [B,S])``; equal ids attend (packing).
      kv_lengths: ``[B]`` int32; keys at or past the length are padding.
      scale: logit scale, default ``H ** -0.5``.
      bias: additive fp32 logits bias ``[B|1, N|1, T, S]`` (T5 relative bias, ALiBi).
      q_positions, kv_positions: ``[B,T]`` / ``[B,S]`` int32 positions at which the mask is
        evaluated (incremental decoding, rolling caches); default bottom-right aligned.
      block_q: queries per block (``query_blocks``; default from the logits budget); the
        result does not depend on it beyond fp32 rounding.
      score_mod: a ``kernels.score_mods`` value applied to the scaled logits of visible pairs
        at their positions (ALiBi, T5 buckets, soft-capping, sinks, a user function).
    """
    checks.check_qkv(q, k, v, value_dim=True)
    mask = _check(q, k, mask, segment_ids, kv_lengths, bias, q_positions, kv_positions,
                  score_mod)
    (b, t, n, _), s = q.shape, k.shape[1]
    aligned = q_positions is None and kv_positions is None
    blocks = query_blocks(mask, b, t, s, n, aligned=aligned, block_q=block_q)
    if len(blocks) == 1 and blocks[0][2:] == (0, s):
        return _dense_attention(q, k, v, mask, segment_ids, kv_lengths, scale, bias,
                                q_positions, kv_positions, score_mod=score_mod).astype(q.dtype)
    # A block's positions are its slice of the whole call's (default: bottom-right aligned).
    q_positions, kv_positions = _default_positions(b, t, s, q_positions, kv_positions)
    outs = []
    for q0, q1, k0, k1 in blocks:
        if k0 == k1:  # these rows see no key: zeros (and zero gradients)
            outs.append(jnp.zeros((b, q1 - q0, n, v.shape[-1]), jnp.float32))
            continue
        q_pos, kv_pos = q_positions[:, q0:q1], kv_positions[:, k0:k1]
        segments = None if segment_ids is None else (segment_ids[0][:, q0:q1],
                                                      segment_ids[1][:, k0:k1])
        # Key lengths count slots from 0: shift them to this block's first key.
        lengths = None if kv_lengths is None else kv_lengths - k0
        outs.append(_dense_attention(
            q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], mask, segments, lengths, scale,
            None if bias is None else bias[:, :, q0:q1, k0:k1], q_pos, kv_pos, kv_len=s,
            score_mod=score_mod))
    return jnp.concatenate(outs, axis=1).astype(q.dtype)


def attention_weights(q: jax.Array, k: jax.Array, *, mask: Any = None, segment_ids=None,
                      kv_lengths=None, scale=None, bias=None, q_positions=None,
                      kv_positions=None, score_mod=None) -> jax.Array:
    """The ``[B, N, T, S]`` fp32 softmax weights (for visualisation); hidden rows are zero."""
    mask = _check(q, k, mask, segment_ids, kv_lengths, bias, q_positions, kv_positions,
                  score_mod)
    logits, visible_bts = _masked_logits(q, k, mask, segment_ids, kv_lengths, scale, bias,
                                         q_positions, kv_positions, score_mod=score_mod)
    b, kh, g, t, s = logits.shape
    probs = jnp.where(visible_bts[:, None, None], _softmax(logits, score_mod), 0.0)
    return probs.reshape(b, kh * g, t, s)


def dequantise_pages(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """fp32 values of int8 pages ``[K, P, L, H]`` with per-(kv head, token) scales
    ``[K, P, L]`` (symmetric quantisation: value = code * scale); any leading shape."""
    return codes.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    mask: masks_lib.Mask | None = None, scale: float | None = None,
                    k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None,
                    score_mod: score_mods.ScoreMod | None = None,
                    value_dim: int | None = None) -> jax.Array:
    """Reference for ``kernels.paged_attention``: gather each sequence's pages into K-major
    K/V ``[K, B, max_pages * L, H]``, then dense attention with the new tokens at positions
    ``lengths - T .. lengths - 1`` and keys past ``lengths`` as padding. Also the ``xla``
    implementation's decode step over a paged cache (``tx.attention.registry``).

    q is ``[B, N, H]`` or ``[B, T, N, H]``; k_pages/v_pages ``[K, P, L, H]``; block_tables
    ``[B, max_pages]`` int32; lengths ``[B]`` int32 (new tokens included). With
    ``k_scales``/``v_scales`` ``[K, P, L]`` the pages are int8 codes: the gathered pages are
    dequantised (``dequantise_pages``) and attended in fp32, the output cast to q's dtype.

    A page id outside ``[0, P)`` reads as an empty page (its keys hidden, as if past the
    length), as in the kernel: gathering it would clamp or wrap onto another sequence's page.

    ``value_dim``: ``v_pages`` (and ``v_scales``) are None and the values are the first
    ``value_dim`` columns of the (dequantised) keys; the output is ``[..., N, value_dim]``
    (MLA's latent pages: ``[c_kv, k_rope]`` stored once per token).
    """
    checks.check_value_dim(value_dim, k_pages.shape[-1], v_pages, v_scales)
    if value_dim is not None:
        v_pages = v_scales = None
    elif (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales must be given together (int8 pages) or not at "
                         f"all; got k_scales={'None' if k_scales is None else 'array'}, "
                         f"v_scales={'None' if v_scales is None else 'array'}.")
    out_dtype = q.dtype
    squeeze = q.ndim == 3
    q_btnh = q[:, None] if squeeze else q
    b, t, n = q_btnh.shape[:3]
    kh, p, page, h = k_pages.shape
    mask = checks.check_mask(mask)
    score_mods.check(score_mod, n)
    score_mods.split(score_mod, n)  # refuses row/column tables: a pool has no rows of them
    s = block_tables.shape[1] * page
    tables = block_tables.astype(jnp.int32)
    real = (tables >= 0) & (tables < p)                                   # [B, max_pages]
    tables = jnp.where(real, tables, 0)
    # Whole pages, [K, B, max_pages, L, H] -> [K, B, S, H]: no transpose on the way.
    k = k_pages[:, tables].reshape(kh, b, s, h)
    if value_dim is None:
        v = v_pages[:, tables].reshape(kh, b, s, v_pages.shape[-1])
    if k_scales is not None:
        k = dequantise_pages(k, k_scales[:, tables].reshape(kh, b, s))
        if value_dim is None:
            v = dequantise_pages(v, v_scales[:, tables].reshape(kh, b, s))
        q_btnh = q_btnh.astype(jnp.float32)
    if value_dim is not None:
        v = k[..., :value_dim]
    real_bs = jnp.repeat(real, page, axis=1)                              # [B, S]
    # Zeroed values keep an empty page's contents, and a named page's slots past the row's
    # length (another sequence's page, stale or NaN), out of the weighted sum.
    written = jnp.arange(s, dtype=jnp.int32)[None, :] < lengths.astype(jnp.int32)[:, None]
    v = jnp.where((real_bs & written)[None, :, :, None], v, 0)
    kv_positions = jnp.where(real_bs, jnp.arange(s, dtype=jnp.int32)[None, :], -1)  # -1: empty
    lengths = lengths.astype(jnp.int32)
    q_positions = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    if b * n * t * s * 4 > _BLOCK_LOGITS_BYTES:  # a long prefill: query blocks bound the logits
        k, v = jnp.moveaxis(k, 0, 2), jnp.moveaxis(v, 0, 2)                 # [B, S, K, H]
        out = attention(q_btnh, k, v, mask=mask, kv_lengths=lengths, scale=scale,
                        q_positions=q_positions, kv_positions=kv_positions, score_mod=score_mod)
    else:
        out = _dense_attention(q_btnh, k, v, mask, None, lengths, scale, None, q_positions,
                               kv_positions, score_mod=score_mod, kv_major=True)
    out = out.astype(out_dtype)
    return out[:, 0] if squeeze else out


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array | None, lengths: jax.Array, *,
                     mask: masks_lib.Mask | None = None, scale: float | None = None,
                     score_mod: score_mods.ScoreMod | None = None,
                     value_dim: int | None = None) -> jax.Array:
    """New queries ``q [B, T, N, H]`` over a contiguous cache ``k [B, S, K, H]``, ``v [B, S,
    K, Hv]`` whose first ``lengths [B]`` slots are written, the queries at positions
    ``lengths - T .. lengths - 1`` (``tx.attention.calls.Cached``). With ``value_dim``, v is
    None and the values are ``k[..., :value_dim]``."""
    checks.check_value_dim(value_dim, k.shape[-1], v)
    if value_dim is not None:
        v = k[..., :value_dim]
    b, t = q.shape[:2]
    lengths = lengths.astype(jnp.int32)
    q_positions = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    s = k.shape[1]
    kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return attention(q, k, v, mask=mask, kv_lengths=lengths, scale=scale,
                     q_positions=q_positions, kv_positions=kv_positions, score_mod=score_mod)


def linear_attention(q_f: jax.Array, k_f: jax.Array, v: jax.Array, *,
                     segment_ids: Any = None, kv_lengths: jax.Array | None = None,
                     causal: bool = True, eps: float = 0.0) -> jax.Array:
    """Reference for ``kernels.linear_attention``: the plain quadratic form of linear attention.

    q_f ``[B,T,N,F]`` and k_f ``[B,S,K,F]`` are featurised queries and keys (the caller's
    feature map), v ``[B,S,K,H]``. Materialises the fp32 scores ``q_f . k_f`` ``[B,K,G,T,S]``
    (grouped, K/V never repeated), zeroes the hidden pairs and normalises by the row sum:
    ``out[t] = sum_s A[t,s] v[s] / (sum_s A[t,s] + eps)``; zeros (and zero gradients) where
    that denominator is 0, e.g. a row that sees no key. Output in v's dtype.

    Args:
      segment_ids: ``[B, T]`` int document ids (S == T), or a pair ``(q_ids [B,T],
        kv_ids [B,S])``; equal ids attend.
      kv_lengths: ``[B]`` int; keys at or past the length are invisible.
      causal: key ``s`` is visible to query ``t`` iff ``s <= t + S - T`` (bottom-right);
        ``False`` is bidirectional (encoders).
      eps: added to the denominator.
    """
    from tx.kernels.linear_attention import check_arguments  # the op's own argument checks
    pair = isinstance(segment_ids, (tuple, list))
    b, t, s, n, kh, f, h = check_arguments(
        q_f, k_f, v, segment_ids=None if pair else segment_ids, kv_lengths=kv_lengths,
        eps=eps, same_length=False, limits=False)
    if segment_ids is not None and not pair and s != t:
        raise ValueError(f"segment_ids of shape {tuple(segment_ids.shape)} need k_f.shape[1]="
                         f"{s} == q_f.shape[1]={t}; pass a pair (q_ids [B, T], kv_ids [B, S]).")
    if pair:
        checks.check_segment_ids(tuple(segment_ids), b, t, s)
    g = n // kh
    scores = jnp.einsum("BTKGF,BSKF->BKGTS", q_f.reshape(b, t, kh, g, f), k_f,
                        preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    visible = jnp.ones((b, t, s), bool)                                    # [B, T, S]
    if causal:
        visible &= (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids if pair else (segment_ids, segment_ids)
        visible &= q_ids[:, :, None] == kv_ids[:, None, :]
    if kv_lengths is not None:
        visible &= jnp.arange(s)[None, None, :] < kv_lengths[:, None, None]
    scores = jnp.where(visible[:, None, None], scores, 0.0)
    num = jnp.einsum("BKGTS,BSKH->BTKGH", scores, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    den = jnp.moveaxis(scores.sum(-1), 3, 1) + eps                         # [B, T, K, G]
    ok = den != 0.0
    out = jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)
    return out.reshape(b, t, n, h).astype(v.dtype)
