"""Attention masks as small frozen values.

A mask answers three questions, all in *position* space:

* ``predicate(q_pos, kv_pos, kv_len)``: may the query at position ``q_pos`` see the key at
  ``kv_pos``? Works elementwise on numpy or jax integer arrays (traceable inside a kernel).
  ``kv_len`` is the static number of key positions; only length-dependent patterns
  (BigBird's random blocks) use it.
* ``dense(q_len, kv_len)``: the boolean ``[T, S]`` matrix, for references and tests.
* ``tile_map(q_len, kv_len, block_q, block_k)``: ``[ceil(T/block_q), ceil(S/block_k)]`` int8 of
  ``EMPTY`` / ``PARTIAL`` / ``FULL``, so a kernel can skip empty tiles and drop per-element
  masking on full ones. Only in-range pairs count: a ragged last tile is FULL when every real
  pair in it is visible.

Queries are aligned bottom-right: query row ``i`` sits at position ``i + kv_len - q_len``, so
when ``q_len < kv_len`` (chunked prefill, decode) the last query sees the last key.

Masks are frozen dataclasses, hence hashable, so ``jit`` can specialise on them and the tile
maps are cached per (mask, shape, block sizes). Segment ids and key lengths are data, not masks;
they combine with any mask inside the attention implementations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2

Array = Any  # numpy or jax array of integer positions


class Mask:
    """Base class: subclasses implement ``predicate``; banded masks also ``band``."""

    def predicate(self, q_pos: Array, kv_pos: Array, kv_len: int) -> Array:
        raise NotImplementedError

    def band(self) -> tuple[float, float] | None:
        """``(lo, hi)`` when the mask is exactly ``lo <= kv_pos - q_pos <= hi``, else None."""
        return None

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        q_pos, kv_pos = aligned_positions(q_len, kv_len)
        out = self.predicate(q_pos[:, None], kv_pos[None, :], kv_len)
        return np.broadcast_to(np.asarray(out, dtype=bool), (q_len, kv_len))

    def tile_map(self, q_len: int, kv_len: int, block_q: int, block_k: int) -> np.ndarray:
        return _tile_map(self, q_len, kv_len, block_q, block_k)

    def __and__(self, other: Mask) -> Mask:
        _check_mask("other", other)
        return And(self, other)

    def __or__(self, other: Mask) -> Mask:
        _check_mask("other", other)
        return Or(self, other)


def _check_mask(name: str, value: Any) -> None:
    if not isinstance(value, Mask):
        raise TypeError(f"{name}={value!r} is not a Mask; build one from kernels.masks "
                        "(Full(), Causal(), Local(w), ...).")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def aligned_positions(q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Bottom-right aligned positions: the last query sits at the last key."""
    q_pos = np.arange(q_len, dtype=np.int32) + np.int32(kv_len - q_len)
    return q_pos, np.arange(kv_len, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query sees every key (bidirectional encoders, cross-attention)."""

    def predicate(self, q_pos, kv_pos, kv_len):
        return (q_pos >= kv_pos) | (q_pos < kv_pos)  # all-True with the broadcast shape

    def band(self):
        return (-math.inf, math.inf)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Key ``j`` is visible to query ``i`` iff ``j <= i`` (bottom-right aligned)."""

    def predicate(self, q_pos, kv_pos, kv_len):
        return kv_pos <= q_pos

    def band(self):
        return (-math.inf, 0)


@dataclasses.dataclass(frozen=True)
class Local(Mask):
    """Sliding window: ``i - left <= j <= i + right``.

    ``Local(W - 1)`` is the causal window of W keys (Mistral); ``Local(w, w)`` is the
    bidirectional window of Longformer/BigBird's local part.
    """

    left: int
    right: int = 0

    def __post_init__(self):
        _check_int("left", self.left, 0)
        _check_int("right", self.right, 0)

    def predicate(self, q_pos, kv_pos, kv_len):
        return (kv_pos >= q_pos - self.left) & (kv_pos <= q_pos + self.right)

    def band(self):
        return (-self.left, self.right)


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
    """Sparse Transformer strided pattern (causal): the last ``stride`` keys, plus every key
    a multiple of ``stride`` behind the query. Two such heads/layers cover all of the past in
    two hops."""

    stride: int

    def __post_init__(self):
        _check_int("stride", self.stride, 1)

    def predicate(self, q_pos, kv_pos, kv_len):
        d = q_pos - kv_pos
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))


@dataclasses.dataclass(frozen=True)
class GlobalTokens(Mask):
    """Longformer-style global positions: they see every key and every query sees them.

    Alone it shows only the global rows and columns; combine it with a window:
    ``Local(w, w) | GlobalTokens((0,))``.
    """

    indices: tuple[int, ...]

    def __post_init__(self):
        if isinstance(self.indices, (int, np.integer)):
            raise ValueError(f"indices={self.indices!r} must be a sequence of positions, "
                             f"e.g. GlobalTokens(({self.indices},)).")
        indices = tuple(sorted({int(i) for i in self.indices}))
        if not indices or indices[0] < 0:
            raise ValueError(f"indices={self.indices!r} must be a non-empty sequence of "
                             "non-negative positions.")
        object.__setattr__(self, "indices", indices)

    def predicate(self, q_pos, kv_pos, kv_len):
        hit_q = functools.reduce(lambda acc, i: acc | (q_pos == i), self.indices, q_pos != q_pos)
        hit_kv = functools.reduce(lambda acc, i: acc | (kv_pos == i), self.indices,
                                  kv_pos != kv_pos)
        return hit_q | hit_kv


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply) that gives the same bits in numpy and jax:
    both wrap uint32 arithmetic modulo 2**32."""
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
    """BigBird block-sparse pattern over blocks of ``block`` positions.

    Query block ``qb`` sees key block ``kb`` when ``|qb - kb| <= window_blocks // 2``
    (sliding), when either is one of the first ``global_blocks`` blocks (global), or when
    ``kb`` is one of ``random_blocks`` pseudo-random blocks drawn for ``qb`` from
    ``seed`` (fixed for a given key length).
    """

    block: int
    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 1
    seed: int = 0

    def __post_init__(self):
        _check_int("block", self.block, 1)
        _check_int("window_blocks", self.window_blocks, 1)
        _check_int("global_blocks", self.global_blocks, 0)
        _check_int("random_blocks", self.random_blocks, 0)
        _check_int("seed", self.seed, 0)

    def predicate(self, q_pos, kv_pos, kv_len):
        qb, kb = q_pos // self.block, kv_pos // self.block
        visible = abs(qb - kb) <= self.window_blocks // 2
        visible = visible | (qb < self.global_blocks) | (kb < self.global_blocks)
        num_kv_blocks = max(1, -(-kv_len // self.block))
        for r in range(self.random_blocks):
            salt = np.uint32((r * 0x85EBCA6B + self.seed * 0x27D4EB2F) & 0xFFFFFFFF)
            key = qb.astype(np.uint32) * np.uint32(0x9E3779B1) + salt
            pick = (_mix32(key) % np.uint32(num_kv_blocks)).astype(kb.dtype)
            visible = visible | (kb == pick)
        return visible


@dataclasses.dataclass(frozen=True)
class SegmentMemory(Mask):
    """Transformer-XL's training view as one pass (Dai et al., 2019): the sequence is cut into
    segments of ``segment`` positions; query ``i`` sees its own segment causally plus the
    ``memory`` positions before its segment's start, ``start(i) - memory <= j <= i`` with
    ``start(i) = (i // segment) * segment``. A recurrent pass that carries the last
    ``memory`` hidden states of each layer computes exactly this, segment by segment."""

    segment: int
    memory: int = 0

    def __post_init__(self):
        _check_int("segment", self.segment, 1)
        _check_int("memory", self.memory, 0)

    def predicate(self, q_pos, kv_pos, kv_len):
        start = (q_pos // self.segment) * self.segment
        return (kv_pos <= q_pos) & (kv_pos >= start - self.memory)


@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Visible in both (e.g. ``Causal() & Strided(8)``)."""

    a: Mask
    b: Mask

    def predicate(self, q_pos, kv_pos, kv_len):
        return self.a.predicate(q_pos, kv_pos, kv_len) & self.b.predicate(q_pos, kv_pos, kv_len)

    def band(self):
        ba, bb = self.a.band(), self.b.band()
        if ba is None or bb is None:
            return None
        return (max(ba[0], bb[0]), min(ba[1], bb[1]))


@dataclasses.dataclass(frozen=True)
class Or(Mask):
    """Visible in either (e.g. ``Local(64, 64) | GlobalTokens((0,))``)."""

    a: Mask
    b: Mask

    def predicate(self, q_pos, kv_pos, kv_len):
        return self.a.predicate(q_pos, kv_pos, kv_len) | self.b.predicate(q_pos, kv_pos, kv_len)


# --- tile maps -------------------------------------------------------------------------------

def _check_tiles(q_len, kv_len, block_q, block_k):
    _check_int("q_len", q_len, 1)
    _check_int("kv_len", kv_len, 1)
    _check_int("block_q", block_q, 1)
    _check_int("block_k", block_k, 1)


@functools.lru_cache(maxsize=256)
def _tile_map(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int) -> np.ndarray:
    _check_tiles(q_len, kv_len, block_q, block_k)
    band = mask.band()
    out = _band_tile_map(band, q_len, kv_len, block_q, block_k) if band else \
        _exact_tile_map(mask, q_len, kv_len, block_q, block_k)
    out.setflags(write=False)  # cached: callers must not edit it
    return out


def _band_tile_map(band, q_len, kv_len, block_q, block_k) -> np.ndarray:
    """Closed form for ``lo <= kv - q <= hi``: a tile's offsets span ``[k0 - q1, k1 - q0]``."""
    lo, hi = band
    q_pos, kv_pos = aligned_positions(q_len, kv_len)
    q0, q1 = q_pos[::block_q], q_pos[np.minimum(np.arange(0, q_len, block_q) + block_q, q_len) - 1]
    k0, k1 = kv_pos[::block_k], kv_pos[np.minimum(np.arange(0, kv_len, block_k) + block_k, kv_len) - 1]
    d_min = k0[None, :].astype(np.int64) - q1[:, None]
    d_max = k1[None, :].astype(np.int64) - q0[:, None]
    empty = (d_max < lo) | (d_min > hi)
    full = (d_min >= lo) & (d_max <= hi)
    return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _exact_tile_map(mask, q_len, kv_len, block_q, block_k) -> np.ndarray:
    """Evaluate the predicate one row of tiles at a time (memory ``block_q * S``)."""
    num_q, num_k = -(-q_len // block_q), -(-kv_len // block_k)
    q_pos, kv_pos = aligned_positions(q_len, kv_len)
    pad_k = num_k * block_k - kv_len
    out = np.empty((num_q, num_k), np.int8)
    for qb in range(num_q):
        rows = q_pos[qb * block_q:(qb + 1) * block_q]
        vis = np.broadcast_to(mask.predicate(rows[:, None], kv_pos[None, :], kv_len),
                              (rows.size, kv_len))
        # Padding keys count as visible for "all" and invisible for "any": out of range.
        any_ = np.pad(vis, ((0, 0), (0, pad_k)), constant_values=False)
        all_ = np.pad(vis, ((0, 0), (0, pad_k)), constant_values=True)
        any_ = any_.reshape(rows.size, num_k, block_k).any(axis=(0, 2))
        all_ = all_.reshape(rows.size, num_k, block_k).all(axis=(0, 2))
        out[qb] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    return out


def density(mask: Mask, q_len: int, kv_len: int) -> float:
    """Fraction of visible (query, key) pairs; benchmarks count FLOPs with it."""
    q_pos, kv_pos = aligned_positions(q_len, kv_len)
    visible = 0
    for start in range(0, q_len, 1024):
        rows = q_pos[start:start + 1024]
        vis = mask.predicate(rows[:, None], kv_pos[None, :], kv_len)
        visible += int(np.broadcast_to(vis, (rows.size, kv_len)).sum())
    return visible / (q_len * kv_len)
