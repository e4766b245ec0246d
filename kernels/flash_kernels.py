"""The flash-attention kernels themselves (the forward, dq and dk/dv programs) and the static
config of one call (``Config``). The algorithm, layout and the ``pallas_call`` wiring are in
``kernels.flash_attention``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tx.kernels import masks as masks_lib
from tx.kernels import online_softmax, row_tables, tile_logits, tiles
from tx.kernels.block_sizes import BlockSizes
from tx.kernels.common import round_up
from tx.kernels.online_softmax import dot as _dot

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about one call (hashable: it keys jit and custom_vjp)."""

    mask: masks_lib.Mask
    scale: float
    q_len: int          # T
    kv_len: int         # S
    head_dim: int       # H as given
    head_dim_pad: int   # H padded to a power of two >= 16
    group: int          # G = N / K
    fold: int           # query heads per program (power of two dividing G)
    blocks: BlockSizes  # effective (clamped) block sizes
    has_segments: bool
    has_lengths: bool
    interpret: bool
    mod: Any = None     # tree structure of the score modifier (kernels.score_mods), or None
    mod_width: int = 0  # its parameter columns per head, padded to a power of two
    has_sinks: bool = False
    row_width: int = 0  # padded columns of the modifier's row / column tables (row_tables)
    col_width: int = 0
    # Values of their own head dim Hv (MLA's expanded form: 192-wide q/k, 128-wide v) and
    # its padding; 0: the values are H wide, as q and k (the common case).
    value_dim: int = 0
    value_dim_pad: int = 0

    @property
    def v_dim(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def v_pad(self) -> int:
        return self.value_dim_pad or self.head_dim_pad

    @property
    def q_pad(self) -> int:
        b = self.blocks
        return round_up(self.q_len, max(b.block_q, b.block_q_dq, b.block_q_dkv))

    @property
    def kv_pad(self) -> int:
        b = self.blocks
        return round_up(self.kv_len, max(b.block_k, b.block_k_dq, b.block_k_dkv))


def group_fold(group: int) -> int:
    """The largest power of two dividing ``group``."""
    return group & -group


# --- the kernels -------------------------------------------------------------------------------

def _visible(cfg: Config, q_block, kv_start, rows, cols, kv_len, q_seg, kv_seg):
    """``[rows, cols]`` bool for a PARTIAL tile: the mask, bounds, key length, segments.

    ``q_block`` is the query block index (row ``r`` is position ``q_block * block_q + r //
    fold``), ``kv_start`` the first key of the tile.
    """
    t_idx = q_block * (rows // cfg.fold) + \
        lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // cfg.fold          # [rows, 1]
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)      # [1, cols]
    q_pos = t_idx + (cfg.kv_len - cfg.q_len)                               # bottom-right
    visible = cfg.mask.predicate(q_pos, kv_pos, cfg.kv_len)
    visible = visible & (t_idx < cfg.q_len) & (kv_pos < kv_len)
    if q_seg is not None:
        visible = visible & (q_seg[:, None] == kv_seg[None, :])
    return visible


def _split_refs(cfg: Config, refs):
    """``(q_seg, kv_seg, params, sinks, outputs)`` from the trailing refs of a kernel; absent
    inputs are None."""
    refs = list(refs)
    q_seg, kv_seg = (refs.pop(0), refs.pop(0)) if cfg.has_segments else (None, None)
    params = refs.pop(0) if cfg.mod_width else None
    sinks = refs.pop(0) if cfg.has_sinks else None
    return q_seg, kv_seg, params, sinks, refs


def forward_kernel(table_ref, q_ref, k_ref, v_ref, *refs, cfg: Config, precision):
    q_seg_ref, kv_seg_ref, params_ref, sinks_ref, refs = _split_refs(cfg, refs)
    rows_ref, cols_ref, (o_ref, lse_ref) = row_tables.split_refs(cfg, refs)
    rows, block_k = q_ref.shape[0], cfg.blocks.block_k
    row_tab = None if rows_ref is None else rows_ref[...]                  # [rows, Wr]
    q_block = pl.program_id(2)
    q = q_ref[...]                                                         # [rows, Hp]
    q_seg = q_seg_ref[...] if cfg.has_segments else None                   # [rows]
    params = params_ref[...] if cfg.mod_width else None                    # [rows, W]
    ids = tile_logits.program_ids()
    kv_len = table_ref[tiles.KV_LEN]

    def visit(kv_block, carry, masked):
        m_prev, l_prev, acc = carry
        kv_start = pl.multiple_of(kv_block * block_k, block_k)
        k = k_ref[pl.ds(kv_start, block_k), :]                             # [block_k, Hp]
        col_tab = None if cols_ref is None else cols_ref[pl.ds(kv_start, block_k), :]
        s = tile_logits.logits(cfg, q, k, params, ids, q_block, kv_start, precision,
                               (row_tab, col_tab))                         # [rows, block_k]
        if masked:
            kv_seg = kv_seg_ref[pl.ds(kv_start, block_k)] if cfg.has_segments else None
            keep = _visible(cfg, q_block, kv_start, rows, block_k, kv_len, q_seg, kv_seg)
            s = jnp.where(keep, s, -jnp.inf)
        v = v_ref[pl.ds(kv_start, block_k), :]                             # [block_k, Hp]
        return online_softmax.update(m_prev, l_prev, acc, s, v, precision)

    carry = (*tile_logits.initial_max(cfg, sinks_ref, rows),
             jnp.zeros((rows, v_ref.shape[-1]), jnp.float32))               # [rows, Hv_p]
    m, l, acc = tiles.visit_tiles(table_ref, visit, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)  # acc is 0 where nothing seen
    # Base-2 lse of the scaled logits; +inf makes every recomputed probability of a fully
    # masked row exactly 0 in the backward pass.
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), jnp.inf)


def dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: Config, precision):
    q_seg_ref, kv_seg_ref, params_ref, _, outs = _split_refs(cfg, refs)
    rows_ref, cols_ref, outs = row_tables.split_refs(cfg, outs)
    dq_ref = outs[0]
    rows, block_k = q_ref.shape[0], cfg.blocks.block_k_dq
    q_block = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]                                        # [rows, Hp]
    lse, delta = lse_ref[...], delta_ref[...]                              # [rows]
    q_seg = q_seg_ref[...] if cfg.has_segments else None
    params = params_ref[...] if cfg.mod_width else None                    # [rows, W]
    row_tab = None if rows_ref is None else rows_ref[...]                  # [rows, Wr]
    ids = tile_logits.program_ids()
    kv_len = table_ref[tiles.KV_LEN]

    def visit(kv_block, carry, masked):
        dq, dparams, drows = carry
        kv_start = pl.multiple_of(kv_block * block_k, block_k)
        k = k_ref[pl.ds(kv_start, block_k), :]                             # [block_k, Hp]
        v = v_ref[pl.ds(kv_start, block_k), :]
        col_tab = None if cols_ref is None else cols_ref[pl.ds(kv_start, block_k), :]
        s, pull = tile_logits.logits_vjp(cfg, q, k, params, ids, q_block, kv_start, precision,
                                         (row_tab, col_tab))
        p = jnp.exp2(s - lse[:, None])                                     # [rows, block_k]
        if masked:
            kv_seg = kv_seg_ref[pl.ds(kv_start, block_k)] if cfg.has_segments else None
            keep = _visible(cfg, q_block, kv_start, rows, block_k, kv_len, q_seg, kv_seg)
            p = jnp.where(keep, p, 0.0)
        dp = _dot(do, v, (1, 1), precision)                                # [rows, block_k]
        ds, d_params, *d_tables = pull(p * (dp - delta[:, None]))  # through the modifier
        if d_params is not None:  # the parameters' share of this tile, per row
            dparams = dparams + d_params
        if row_tab is not None:  # the row table's share: this row's pairs of the tile
            drows = drows + d_tables[0][0]
        return dq + _dot(ds.astype(k.dtype), k, (1, 0), precision), dparams, drows

    carry = (jnp.zeros(q.shape, jnp.float32),
             jnp.zeros((rows, cfg.mod_width), jnp.float32) if cfg.mod_width else None,
             None if row_tab is None else jnp.zeros(row_tab.shape, jnp.float32))
    dq, dparams, drows = tiles.visit_tiles(table_ref, visit, carry)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    if cfg.mod_width:
        outs[1][...] = dparams
    if row_tab is not None:
        outs[-1][...] = drows


def dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg: Config, precision):
    q_seg_ref, kv_seg_ref, params_ref, _, refs = _split_refs(cfg, refs)
    rows_ref, cols_ref, (dk_ref, dv_ref, *dcols_ref) = row_tables.split_refs(cfg, refs)
    block_k = k_ref.shape[0]
    col_tab = None if cols_ref is None else cols_ref[...]                  # [block_k, Wc]
    rows = cfg.blocks.block_q_dkv * cfg.fold
    kv_start = pl.program_id(2) * block_k
    k, v = k_ref[...], v_ref[...]                                          # [block_k, Hp]
    kv_seg = kv_seg_ref[...] if cfg.has_segments else None                 # [block_k]
    params = params_ref[...] if cfg.mod_width else None                    # [rows, W]
    ids = tile_logits.program_ids()
    kv_len = table_ref[tiles.KV_LEN]

    def visit(q_block, carry, masked):
        dk, dv, dcols = carry
        rows_slice = pl.ds(pl.multiple_of(q_block * rows, rows), rows)
        q, do = q_ref[rows_slice, :], do_ref[rows_slice, :]                # [rows, Hp]
        lse, delta = lse_ref[rows_slice], delta_ref[rows_slice]            # [rows]
        row_tab = None if rows_ref is None else rows_ref[rows_slice, :]
        s, pull = tile_logits.logits_vjp(cfg, q, k, params, ids, q_block, kv_start, precision,
                                         (row_tab, col_tab))
        p = jnp.exp2(s - lse[:, None])                                     # [rows, block_k]
        if masked:
            q_seg = q_seg_ref[rows_slice] if cfg.has_segments else None
            keep = _visible(cfg, q_block, kv_start, rows, block_k, kv_len, q_seg, kv_seg)
            p = jnp.where(keep, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0), precision)         # [block_k, Hp]
        dp = _dot(do, v, (1, 1), precision)                                # [rows, block_k]
        pulled = pull(p * (dp - delta[:, None]))  # through the modifier
        ds = pulled[0]
        if col_tab is not None:  # the column table's share: this key block's pairs
            dcols = dcols + pulled[2][1]
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0), precision)          # [block_k, Hp]
        return dk, dv, dcols

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
             None if col_tab is None else jnp.zeros(col_tab.shape, jnp.float32))
    dk, dv, dcols = tiles.visit_tiles(table_ref, visit, carry)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if col_tab is not None:
        dcols_ref[0][...] = dcols
