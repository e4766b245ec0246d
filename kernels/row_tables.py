"""Score modifiers with data per query row and per key column: DeBERTa's disentangled attention.

DeBERTa (He et al., 2021, arXiv:2006.03654; v2/v3 log buckets) adds two terms to each logit
of query ``i`` and key ``j``: content-to-position ``c2p[b, i, n, idx(i, j)]`` (the query
against the relative-position keys) and position-to-content ``p2c[b, j, n, idx(i, j)]`` (the
key against the relative-position queries), with ``idx`` the clipped log bucket of ``i - j``.
The tables are ``[B, T, N, R]`` and ``[B, S, N, R]`` (``R = 2 * span``): a row of ``c2p``
belongs to one query row, a row of ``p2c`` to one key column, so neither is a ``[T, S]``
tensor and both get gradients.

Where it runs. ``kernels.score_mods.Context`` carries the two tables (``rows``/``cols``); the
reference gathers from them; the flash kernel loads the row block of ``c2p`` with its q tile
and the column block of ``p2c`` with its key tile, and looks up by masked reductions over the
bucket values present in the tile (no gather, so the Triton lowering stays possible). The dq
kernel, which sees each row with every key, returns ``d c2p``; the dk/dv kernel, which sees
each key with every row, returns ``d p2c``. The column table is per query head, so a call
with one runs one query head per program (``fold = 1``): K/V tiles are then loaded once per
query head rather than once per group.

Only dense self-attention takes these tables (``T == S``, positions ``0 .. T-1``): a decoding
cache or a paged pool is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from tx.kernels import score_mods
from tx.kernels.common import next_pow2

__all__ = ["Disentangled", "log_bucket", "relative_index", "TERMS"]

TERMS = ("c2p", "p2c")


# --- DeBERTa-v2's relative positions -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bucket_thresholds(bucket_size: int, max_position: int) -> tuple[int, ...]:
    """The distances at which DeBERTa-v2's log bucket first reaches ``mid + 1, ..., 2 mid``
    (``mid = bucket_size // 2``; past ``2 mid`` the table index clips anyway).

    HF's formula ``ceil(log(d / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid`` in
    fp32 sits exactly on an integer at ``d = max_position - 1``, where a fused kernel that
    divides by a folded constant rounds the other way; integer thresholds, computed here once
    in fp32 step by step as HF does, make every implementation agree exactly."""
    mid = bucket_size // 2
    f32 = np.float32
    log_max = np.log(f32((max_position - 1) / mid))
    out, d = [], mid + 1
    for v in range(mid + 1, 2 * mid + 1):
        while True:  # far(d) is non-decreasing in d
            ratio = np.log(f32(d) / f32(mid)) / log_max
            if int(np.ceil(ratio * f32(mid - 1))) + mid >= v:
                break
            d += 1
        out.append(d)
    return tuple(out)


def log_bucket(relative, bucket_size: int, max_position: int):
    """DeBERTa-v2's bucket of ``relative = q_pos - kv_pos``: exact within ``bucket_size // 2``,
    then logarithmic up to ``max_position`` (saturating at ``2 * (bucket_size // 2)``, where
    the table index clips anyway). Elementwise integer jnp, so it runs inside a kernel too."""
    mid = bucket_size // 2
    distance = jnp.abs(relative)
    far = jnp.full_like(relative, mid)
    for threshold in bucket_thresholds(bucket_size, max_position):
        far = far + (distance >= threshold).astype(relative.dtype)
    return jnp.where(distance <= mid, relative, far * jnp.sign(relative))


def relative_index(q_pos, kv_pos, *, position_buckets: int, max_relative_positions: int):
    """The table column of each (query, key) pair: ``clip(bucket(q - kv) + span, 0, 2 span - 1)``
    with ``span = position_buckets`` (or ``max_relative_positions`` without buckets)."""
    relative = q_pos - kv_pos
    if position_buckets > 0:
        relative = log_bucket(relative, position_buckets, max_relative_positions)
    span = position_buckets if position_buckets > 0 else max_relative_positions
    return jnp.clip(relative + span, 0, 2 * span - 1)


# --- lookups inside a tile: masked reductions over the bucket values present -------------------

def _span(index):
    """``(lo, hi)``: the loop bounds over the values in ``index`` (a near-diagonal tile holds at
    most ``rows + cols`` of them, a far one one or two)."""
    lo = jnp.min(jnp.min(index, axis=1))
    hi = jnp.max(jnp.max(index, axis=1))
    return lo, hi + 1


def _column(table, j):
    """Column ``j`` of ``table [L, W]`` as ``[L]``, by a masked sum (no dynamic slice)."""
    cols = lax.broadcasted_iota(jnp.int32, table.shape, 1)
    return jnp.sum(jnp.where(cols == j, table, 0.0), axis=1)


def _gather(table, index, axis):
    def body(j, out):
        col = _column(table, j)
        col = col[:, None] if axis == 0 else col[None, :]
        return out + jnp.where(index == j, col, 0.0)
    return lax.fori_loop(*_span(index), body, jnp.zeros(index.shape, jnp.float32))


def _scatter(g, index, width, axis):
    length = index.shape[axis]
    cols = lax.broadcasted_iota(jnp.int32, (length, width), 1)

    def body(j, d):
        part = jnp.sum(jnp.where(index == j, g, 0.0), axis=1 - axis)   # [length]
        return d + jnp.where(cols == j, part[:, None], 0.0)
    return lax.fori_loop(*_span(index), body, jnp.zeros((length, width), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tile_lookup(table, index, axis: int):
    """``table[r, index[r, c]]`` (``axis=0``: one table row per tile row) or
    ``table[c, index[r, c]]`` (``axis=1``: per tile column), ``[rows, cols]`` fp32."""
    return _gather(table, index, axis)


def _lookup_fwd(table, index, axis):
    return _gather(table, index, axis), (index, table.shape[1])


def _lookup_bwd(axis, residuals, g):
    index, width = residuals
    return _scatter(g, index, width, axis), None


tile_lookup.defvjp(_lookup_fwd, _lookup_bwd)


# --- the modifier ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Disentangled(score_mods.ScoreMod):
    """``s * content_scale + c2p[b, i, n, idx] + p2c[b, j, n, idx]`` with ``idx =
    relative_index(i, j)``; ``c2p [B, T, N, R]`` or ``p2c [B, S, N, R]`` may be None (a term
    left out). The tables are in logit units (already scaled); ``content_scale`` rescales the
    content logits (DeBERTa: ``1 / sqrt(1 + terms)`` over the usual ``H ** -0.5``)."""

    c2p: Any = None
    p2c: Any = None
    position_buckets: int = 256
    max_relative_positions: int = 512
    content_scale: float = 1.0
    data_fields = ("c2p", "p2c")

    @property
    def span(self) -> int:
        return self.position_buckets if self.position_buckets > 0 else \
            self.max_relative_positions

    def modify(self, s, ctx):
        index = relative_index(ctx.q_pos, ctx.kv_pos, position_buckets=self.position_buckets,
                               max_relative_positions=self.max_relative_positions)
        if self.content_scale != 1.0:
            s = s * self.content_scale
        if ctx.rows is not None:
            s = s + ctx.row_lookup(index)
        if ctx.cols is not None:
            s = s + ctx.col_lookup(index)
        return s

    def tables(self):
        return self.c2p, self.p2c

    def check(self, num_heads):
        for name, value in (("position_buckets", self.position_buckets),
                            ("max_relative_positions", self.max_relative_positions)):
            if isinstance(value, bool) or not isinstance(value, int):
                score_mods._fail(f"Disentangled.{name}", value, "must be an integer.")
        if self.max_relative_positions < 2 or (
                self.position_buckets > 0 and
                (self.position_buckets < 4 or self.position_buckets > self.max_relative_positions)):
            score_mods._fail("Disentangled.position_buckets", self.position_buckets,
                             "must be <= 0 (no buckets) or in [4, max_relative_positions="
                             f"{self.max_relative_positions}] with max_relative_positions "
                             ">= 2, e.g. 256 and 512 (DeBERTa-v3).")
        if not math.isfinite(self.content_scale) or self.content_scale <= 0:
            score_mods._fail("Disentangled.content_scale", self.content_scale,
                             "must be a finite float > 0, e.g. 3 ** -0.5.")
        if self.c2p is None and self.p2c is None:
            score_mods._fail("Disentangled.c2p", None, "and p2c are both None; give at least "
                             "one table [B, T|S, N, 2 * span].")
        shapes = [tuple(t.shape) for t in (self.c2p, self.p2c) if t is not None]
        for name, table in (("c2p", self.c2p), ("p2c", self.p2c)):
            shape = None if table is None else tuple(getattr(table, "shape", ()))
            if shape is not None and (len(shape) != 4 or shape[2] != num_heads or
                                      shape[3] != 2 * self.span or shape != shapes[0]):
                score_mods._fail(f"Disentangled.{name}.shape", shape,
                                 f"must be [B, T, N, 2 * span] = [B, T, {num_heads}, "
                                 f"{2 * self.span}] (T == S, both tables alike).")


def check_call(score_mod, b: int, t: int, s: int, *, positions: bool = False) -> None:
    """Refuses row/column tables that do not fit a dense self-attention call of ``b`` rows,
    ``t`` queries and ``s`` keys at the default positions, naming the mismatch."""
    rows, cols = score_mods.tables(score_mod)
    if rows is None and cols is None:
        return
    shape = tuple((rows if rows is not None else cols).shape)
    if t != s or shape[:2] != (b, t):
        raise ValueError(f"score_mod tables of shape {shape} need dense self-attention with "
                         f"[B, T] = [{b}, {t}] and T == S; got T={t}, S={s}. A decoding cache "
                         "or cross-attention cannot use row/column tables (DeBERTa is an "
                         "encoder): attend over the whole sequence.")
    if positions:
        raise ValueError("q_positions/kv_positions given with a score modifier holding "
                         "row/column tables: the tables are indexed by query row and key "
                         "column, so pass no positions (rows 0 .. T-1).")


# --- the flash kernel's layout -----------------------------------------------------------------

def width(score_mod) -> tuple[int, int]:
    """``(row_width, col_width)``: the padded columns of each table (0 when absent)."""
    return tuple(0 if x is None else max(16, next_pow2(x.shape[-1]))
                 for x in score_mods.tables(score_mod))


def layout(cfg, tables):
    """``(rows [B, N/fold, T_pad*fold, Wr] | None, cols [B, N, S_pad, Wc] | None)`` fp32:
    ``c2p`` folded like q (row ``r`` is position ``r // fold``, head ``r % fold``), ``p2c``
    head-major (``fold == 1`` whenever it is present)."""
    rows, cols = tables
    if rows is not None:
        b, t, n, r = rows.shape
        x = jnp.pad(rows.astype(jnp.float32),
                    ((0, 0), (0, cfg.q_pad - t), (0, 0), (0, cfg.row_width - r)))
        x = x.reshape(b, cfg.q_pad, n // cfg.fold, cfg.fold, cfg.row_width)
        rows = x.transpose(0, 2, 1, 3, 4).reshape(b, n // cfg.fold, cfg.q_pad * cfg.fold,
                                                  cfg.row_width)
    if cols is not None:
        s, r = cols.shape[1], cols.shape[3]
        x = jnp.pad(cols.astype(jnp.float32),
                    ((0, 0), (0, cfg.kv_pad - s), (0, 0), (0, cfg.col_width - r)))
        cols = x.transpose(0, 2, 1, 3)
    return rows, cols


def unlayout(cfg, tables, d_rows, d_cols):
    """The gradients of the original tables from the kernels' per-row / per-column sums."""
    rows, cols = tables
    if rows is not None:
        b, t, n, r = rows.shape
        x = d_rows.reshape(b, n // cfg.fold, cfg.q_pad, cfg.fold, cfg.row_width)
        d_rows = x.transpose(0, 2, 1, 3, 4).reshape(b, cfg.q_pad, n, cfg.row_width)
        d_rows = d_rows[:, :t, :, :r].astype(rows.dtype)
    if cols is not None:
        s, r = cols.shape[1], cols.shape[3]
        d_cols = d_cols.transpose(0, 2, 1, 3)[:, :s, :, :r].astype(cols.dtype)
    return d_rows, d_cols


def inputs(cfg, folded, row_block: int, row_map, col_block: int, col_map):
    """The kernels' trailing table inputs and their BlockSpecs: ``row_block`` rows of the
    folded ``c2p`` at ``row_map(b, h, i)``, ``col_block`` keys of ``p2c`` at ``col_map``."""
    specs, args = [], []
    rows, cols = folded
    if rows is not None:
        specs.append(pl.BlockSpec((None, None, row_block, cfg.row_width), row_map))
        args.append(rows)
    if cols is not None:
        specs.append(pl.BlockSpec((None, None, col_block, cfg.col_width), col_map))
        args.append(cols)
    return specs, args


def split_refs(cfg, refs):
    """``(rows_ref | None, cols_ref | None, the remaining refs)``."""
    refs = list(refs)
    rows = refs.pop(0) if cfg.row_width else None
    cols = refs.pop(0) if cfg.col_width else None
    return rows, cols, refs
