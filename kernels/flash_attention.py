"""Flash attention in portable Pallas: forward and backward, masks with tile skipping, GQA.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691), online softmax over key tiles with
fp32 accumulation; the backward pass recomputes the probabilities from the saved log-sum-exp
in two kernels (dq over key tiles; dk/dv over query tiles) so no ``T x S`` matrix is ever in
memory. Tile skipping follows splash attention's mask info / FlexAttention's block mask: each
program walks a compact list of the non-empty tiles of its row (``kernels/tiles.py``), full
tiles first (no per-element masking), then partial ones (mask predicate, bounds, segment ids,
key lengths).

Layout. A program handles one (batch, group of ``fold`` query heads sharing one K/V head,
query block). The ``fold`` heads are folded into the rows of the q tile,
``[block_q * fold, H]`` with row ``r`` = (position ``r // fold``, head ``r % fold``), so every
K/V tile is loaded once for all of them and K/V are never repeated in memory. ``fold`` is the
largest power of two dividing ``G = N / K`` (Triton tiles are powers of two); when ``G`` is not
a power of two, ``G / fold`` programs share a K/V head and their dk/dv are summed.

Ragged lengths: T, S and H are zero-padded to tile multiples (powers of two) outside the
kernel; the edge tiles are PARTIAL, so padded keys and rows are masked, and the padding is
sliced off. Fully masked rows return zeros and zero gradients (their lse is stored as +inf).

Score modifiers (``kernels.score_mods``: ALiBi, T5 buckets, soft-capping, sinks, user functions)
change each visible logit inside the tile (``kernels.tile_logits``), at the pair's positions.
Row/column tables (DeBERTa's c2p/p2c, ``kernels.row_tables``) enter as blocks beside the q and
key tiles; the dq kernel returns the row table's gradient, the dk/dv kernel the column one's.
Their per-head parameters enter as one table laid out per tile row; the dq kernel, which sees
every (row, key) pair once, pulls the tile's cotangent back through the modifier with
``jax.vjp`` and sums the parameters' share per row, so the table's gradient needs no ``T x S``
tensor. A sink starts each row's running max and sum; its gradient is closed-form from the
saved lse and the row term ``delta``.

Reference: ``kernels.reference.attention``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tx.kernels import block_sizes as block_sizes_lib
from tx.kernels import checks, tiles
from tx.kernels import masks as masks_lib
from tx.kernels import flash_layout, row_tables, score_mods
from tx.kernels.common import SUPPORTED_DTYPES, compiler_params, next_pow2
from tx.kernels.online_softmax import LOG2E
from tx.kernels.online_softmax import precision as _precision
from tx.kernels.block_sizes import BlockSizes, check_block_sizes
# The kernels and the static config of a call (one file each: this one wires them up).
from tx.kernels.flash_kernels import Config as _Config
from tx.kernels.flash_kernels import dkv_kernel as _dkv_kernel
from tx.kernels.flash_kernels import dq_kernel as _dq_kernel
from tx.kernels.flash_kernels import forward_kernel as _forward_kernel
from tx.kernels.flash_kernels import group_fold as _group_fold

__all__ = ["flash_attention", "registry_attention", "BlockSizes", "check_block_sizes"]


# --- pallas_call wiring ------------------------------------------------------------------------

def _table_spec(table):
    """One row of the visit table per program; shared across the batch when it has no data."""
    width = table.shape[-1]
    if table.shape[0] == 1:
        return pl.BlockSpec((None, None, width), lambda b, h, i: (0, i, 0))
    return pl.BlockSpec((None, None, width), lambda b, h, i: (b, i, 0))


def _kv_head(cfg: _Config):
    per_kv = cfg.group // cfg.fold  # programs (head groups) per K/V head
    return lambda h: h // per_kv


def _row_inputs(cfg: _Config, rows_per_program: int, q_seg, kv_seg, seg_specs, row_params,
                grid_rows):
    """The optional trailing inputs (segment ids, modifier parameters, sinks) and specs.

    ``row_params`` is ``(params [N, W] | None, sinks [N] | None)``; each is laid out one row
    per tile row, ``[N / fold, rows, ...]`` (row ``r`` is head ``h * fold + r % fold``), the
    same for every query block. ``grid_rows`` maps a program index to its head-group block.
    """
    specs, args = [], []
    if cfg.has_segments:
        specs += list(seg_specs)
        args += [q_seg, kv_seg]
    params, sinks = row_params
    reps = rows_per_program // cfg.fold
    if cfg.mod_width:
        w = cfg.mod_width
        p = jnp.pad(params, ((0, 0), (0, w - params.shape[1])))
        args.append(jnp.tile(p.reshape(-1, cfg.fold, w), (1, reps, 1)))
        specs.append(pl.BlockSpec((None, rows_per_program, w), lambda *i: (grid_rows(*i), 0, 0)))
    if cfg.has_sinks:
        args.append(jnp.tile(sinks.reshape(-1, cfg.fold), (1, reps)))
        specs.append(pl.BlockSpec((None, rows_per_program), lambda *i: (grid_rows(*i), 0)))
    return specs, args


def _head_group(b, h, i):
    return h


def _forward_call(cfg: _Config, table, q_f, k_p, v_p, q_seg, kv_seg, row_params, folded):
    b, hg, rows_total, hp = q_f.shape
    rows = cfg.blocks.block_q * cfg.fold
    nq = -(-cfg.q_len // cfg.blocks.block_q)
    kv_head = _kv_head(cfg)
    s_pad, vp = k_p.shape[1], v_p.shape[3]
    in_specs = [
        _table_spec(table),
        pl.BlockSpec((None, None, rows, hp), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, s_pad, None, hp), lambda b, h, i: (b, 0, kv_head(h), 0)),
        pl.BlockSpec((None, s_pad, None, vp), lambda b, h, i: (b, 0, kv_head(h), 0)),
    ]
    args = [table, q_f, k_p, v_p]
    specs, extra = _row_inputs(cfg, rows, q_seg, kv_seg,
                               (pl.BlockSpec((None, rows), lambda b, h, i: (b, i)),
                                pl.BlockSpec((None, s_pad), lambda b, h, i: (b, 0))),
                               row_params, _head_group)
    in_specs, args = in_specs + specs, args + extra
    specs, extra = row_tables.inputs(cfg, folded, rows, lambda b, h, i: (b, h, i, 0),
                                     s_pad, lambda b, h, i: (b, h, 0, 0))
    in_specs, args = in_specs + specs, args + extra
    kernel = functools.partial(_forward_kernel, cfg=cfg, precision=_precision(q_f.dtype))
    return pl.pallas_call(
        kernel, grid=(b, hg, nq), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, rows, vp), lambda b, h, i: (b, h, i, 0)),
                   pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, hg, rows_total, vp), q_f.dtype),
                   jax.ShapeDtypeStruct((b, hg, rows_total), jnp.float32)],
        compiler_params=compiler_params(cfg.interpret, cfg.blocks), interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)


def _dq_call(cfg: _Config, table, q_f, k_p, v_p, do_f, lse, delta, q_seg, kv_seg, row_params,
             folded):
    b, hg, _, hp = q_f.shape
    rows = cfg.blocks.block_q_dq * cfg.fold
    nq = -(-cfg.q_len // cfg.blocks.block_q_dq)
    kv_head = _kv_head(cfg)
    s_pad, vp = k_p.shape[1], v_p.shape[3]
    row_tile = pl.BlockSpec((None, None, rows, hp), lambda b, h, i: (b, h, i, 0))
    row_vec = pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i))
    kv_full = pl.BlockSpec((None, s_pad, None, hp), lambda b, h, i: (b, 0, kv_head(h), 0))
    # Values and the output's cotangent are Hv wide (H, but for MLA's expanded form).
    v_full = pl.BlockSpec((None, s_pad, None, vp), lambda b, h, i: (b, 0, kv_head(h), 0))
    do_tile = pl.BlockSpec((None, None, rows, vp), lambda b, h, i: (b, h, i, 0))
    in_specs = [_table_spec(table), row_tile, kv_full, v_full, do_tile, row_vec,
                row_vec]
    args = [table, q_f, k_p, v_p, do_f, lse, delta]
    specs, extra = _row_inputs(cfg, rows, q_seg, kv_seg,
                               (pl.BlockSpec((None, rows), lambda b, h, i: (b, i)),
                                pl.BlockSpec((None, s_pad), lambda b, h, i: (b, 0))),
                               row_params, _head_group)
    in_specs, args = in_specs + specs, args + extra
    out_specs, out_shape = [row_tile], [jax.ShapeDtypeStruct(q_f.shape, jnp.float32)]
    if cfg.mod_width:  # per-row parameter gradients, summed over the keys
        w = cfg.mod_width
        out_specs.append(pl.BlockSpec((None, None, rows, w), lambda b, h, i: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, hg, q_f.shape[2], w), jnp.float32))
    specs, extra = row_tables.inputs(cfg, folded, rows, lambda b, h, i: (b, h, i, 0),
                                     s_pad, lambda b, h, i: (b, h, 0, 0))
    in_specs, args = in_specs + specs, args + extra
    if cfg.row_width:  # the row table's gradient, summed over the keys
        out_specs.append(pl.BlockSpec((None, None, rows, cfg.row_width),
                                      lambda b, h, i: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, hg, q_f.shape[2], cfg.row_width),
                                              jnp.float32))
    kernel = functools.partial(_dq_kernel, cfg=cfg, precision=_precision(q_f.dtype))
    return pl.pallas_call(
        kernel, grid=(b, hg, nq), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.interpret, cfg.blocks), interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)


def _dkv_call(cfg: _Config, table, q_f, k_p, v_p, do_f, lse, delta, q_seg, kv_seg,
              row_params, folded):
    b, hg, rows_total, hp = q_f.shape
    block_k = cfg.blocks.block_k_dkv
    nk = -(-cfg.kv_len // block_k)
    s_pad = k_p.shape[1]
    kv_head = _kv_head(cfg)
    vp = v_p.shape[3]
    q_full = pl.BlockSpec((None, None, rows_total, hp), lambda b, h, j: (b, h, 0, 0))
    do_full = pl.BlockSpec((None, None, rows_total, vp), lambda b, h, j: (b, h, 0, 0))
    vec_full = pl.BlockSpec((None, None, rows_total), lambda b, h, j: (b, h, 0))
    kv_tile = pl.BlockSpec((None, block_k, None, hp), lambda b, h, j: (b, j, kv_head(h), 0))
    v_tile = pl.BlockSpec((None, block_k, None, vp), lambda b, h, j: (b, j, kv_head(h), 0))
    in_specs = [_table_spec(table), q_full, kv_tile, v_tile, do_full, vec_full, vec_full]
    args = [table, q_f, k_p, v_p, do_f, lse, delta]
    specs, extra = _row_inputs(cfg, cfg.blocks.block_q_dkv * cfg.fold, q_seg, kv_seg,
                               (pl.BlockSpec((None, rows_total), lambda b, h, j: (b, 0)),
                                pl.BlockSpec((None, block_k), lambda b, h, j: (b, j))),
                               row_params, _head_group)
    in_specs, args = in_specs + specs, args + extra
    # One output slot per head group; groups sharing a K/V head (G not a power of two) are
    # summed afterwards, in fp32.
    out_dtype = k_p.dtype if cfg.group == cfg.fold else jnp.float32
    out_tile = pl.BlockSpec((None, block_k, None, hp), lambda b, h, j: (b, j, h, 0))
    out_shape = jax.ShapeDtypeStruct((b, s_pad, hg, hp), out_dtype)
    dv_tile = pl.BlockSpec((None, block_k, None, vp), lambda b, h, j: (b, j, h, 0))
    dv_shape = jax.ShapeDtypeStruct((b, s_pad, hg, vp), out_dtype)
    out_specs, out_shapes = [out_tile, dv_tile], [out_shape, dv_shape]
    specs, extra = row_tables.inputs(cfg, folded, rows_total, lambda b, h, j: (b, h, 0, 0),
                                     block_k, lambda b, h, j: (b, h, j, 0))
    in_specs, args = in_specs + specs, args + extra
    if cfg.col_width:  # the column table's gradient, summed over the queries
        out_specs.append(pl.BlockSpec((None, None, block_k, cfg.col_width),
                                      lambda b, h, j: (b, h, j, 0)))
        out_shapes.append(jax.ShapeDtypeStruct((b, hg, s_pad, cfg.col_width), jnp.float32))
    kernel = functools.partial(_dkv_kernel, cfg=cfg, precision=_precision(q_f.dtype))
    return pl.pallas_call(
        kernel, grid=(b, hg, nk), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shapes,
        compiler_params=compiler_params(cfg.interpret, cfg.blocks), interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)


def _tables(cfg: _Config, segment_ids, kv_lengths):
    b, t, s = cfg.blocks, cfg.q_len, cfg.kv_len
    narrow = functools.partial(tiles.narrowed_table, cfg.mask, t, s, segment_ids=segment_ids,
                               kv_lengths=kv_lengths)
    return (narrow(b.block_q, b.block_k, transpose=False),
            narrow(b.block_q_dq, b.block_k_dq, transpose=False),
            narrow(b.block_q_dkv, b.block_k_dkv, transpose=True))


# --- custom_vjp --------------------------------------------------------------------------------

def _forward(cfg: _Config, q, k, v, segment_ids, kv_lengths, params, sinks, tables):
    table, _, _ = _tables(cfg, segment_ids, kv_lengths)
    q_seg, kv_seg = flash_layout.segments(cfg, segment_ids)
    q_f, k_p = flash_layout.fold_rows(cfg, q), flash_layout.pad_kv(cfg, k)
    v_p = flash_layout.pad_kv(cfg, v, cfg.v_pad)
    o_f, lse = _forward_call(cfg, table, q_f, k_p, v_p, q_seg, kv_seg, (params, sinks),
                             row_tables.layout(cfg, tables))
    return flash_layout.unfold_rows(cfg, o_f, q.dtype, cfg.v_dim), (q_f, k_p, v_p, o_f, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, segment_ids, kv_lengths, params, sinks, tables):
    return _forward(cfg, q, k, v, segment_ids, kv_lengths, params, sinks, tables)[0]


def _flash_fwd(cfg: _Config, q, k, v, segment_ids, kv_lengths, params, sinks, tables):
    out, (q_f, k_p, v_p, o_f, lse) = _forward(cfg, q, k, v, segment_ids, kv_lengths, params,
                                              sinks, tables)
    return out, (q_f, k_p, v_p, o_f, lse, segment_ids, kv_lengths, params, sinks, tables)


def _per_head(cfg: _Config, rows_bhr):
    """``[B, N/fold, T_pad*fold, ...]`` per-row values summed over batch and positions into
    ``[N, ...]``."""
    b, hg, _ = rows_bhr.shape[:3]
    x = rows_bhr.reshape(b, hg, cfg.q_pad, cfg.fold, *rows_bhr.shape[3:])
    return x.sum(axis=(0, 2)).reshape(hg * cfg.fold, *rows_bhr.shape[3:])


def _sinks_grad(cfg: _Config, sinks, lse, delta):
    """d loss / d sink: the sink's weight in row i is ``p_i = exp(sink - lse_i)`` and moving
    its logit moves every key's weight by ``-p_i p_ij``, so the row contributes
    ``-p_i * sum_j p_ij dp_ij = -p_i * delta_i``."""
    hg = lse.shape[1]
    sink_rows = jnp.tile(sinks.reshape(hg, cfg.fold), (1, cfg.q_pad))[None]  # [1, hg, rows]
    p_sink = jnp.exp2(sink_rows * LOG2E - lse)  # 0 on padding rows (lse = +inf there)
    return _per_head(cfg, -p_sink * delta)


def _flash_bwd(cfg: _Config, residuals, do, d_lse=None):
    q_f, k_p, v_p, o_f, lse, segment_ids, kv_lengths, params, sinks, tables = residuals
    folded = row_tables.layout(cfg, tables)
    _, dq_table, dkv_table = _tables(cfg, segment_ids, kv_lengths)
    q_seg, kv_seg = flash_layout.segments(cfg, segment_ids)
    do_f = flash_layout.fold_rows(cfg, do.astype(q_f.dtype), cfg.v_pad)
    # delta_i = sum_h o_ih * do_ih = sum_j p_ij * dp_ij, the softmax-backward row term.
    delta = jnp.sum(o_f.astype(jnp.float32) * do_f.astype(jnp.float32), axis=-1)
    if d_lse is not None:  # the lse's cotangent (kernels.flash_lse): d lse_i / d s_ij = p_ij
        delta = delta - d_lse
    # Rows past T were never written by the forward kernel: pin them to "sees nothing".
    real = (jnp.arange(cfg.q_pad * cfg.fold, dtype=jnp.int32) // cfg.fold < cfg.q_len)[None, None]
    delta = jnp.where(real, delta, 0.0)
    lse = jnp.where(real, lse, jnp.inf)
    row_params = (params, sinks)
    dq_out = _dq_call(cfg, dq_table, q_f, k_p, v_p, do_f, lse, delta, q_seg, kv_seg,
                      row_params, folded)
    dk_p, dv_p, *d_cols = _dkv_call(cfg, dkv_table, q_f, k_p, v_p, do_f, lse, delta, q_seg,
                                    kv_seg, row_params, folded)
    b, s_pad, hg, hp = dk_p.shape
    kh = hg * cfg.fold // cfg.group
    if cfg.group != cfg.fold:  # head groups sharing a K/V head: sum their contributions
        dk_p = dk_p.reshape(b, s_pad, kh, hg // kh, hp).sum(axis=3)
        dv_p = dv_p.reshape(b, s_pad, kh, hg // kh, dv_p.shape[3]).sum(axis=3)
    dq = flash_layout.unfold_rows(cfg, dq_out[0], q_f.dtype)
    dk = dk_p[:, :cfg.kv_len, :, :cfg.head_dim].astype(k_p.dtype)
    dv = dv_p[:, :cfg.kv_len, :, :cfg.v_dim].astype(v_p.dtype)
    d_params = None if params is None else \
        _per_head(cfg, dq_out[1])[:, :params.shape[1]].astype(params.dtype)
    d_sinks = None if sinks is None else _sinks_grad(cfg, sinks, lse, delta).astype(sinks.dtype)
    d_tables = row_tables.unlayout(cfg, tables, dq_out[-1] if cfg.row_width else None,
                                   d_cols[0] if cfg.col_width else None)
    return dq, dk, dv, None, None, d_params, d_sinks, d_tables


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _flash_jit(cfg: _Config, q, k, v, segment_ids, kv_lengths, params, sinks, tables):
    return _flash(cfg, q, k, v, segment_ids, kv_lengths, params, sinks, tables)


# --- public API --------------------------------------------------------------------------------

def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    mask: masks_lib.Mask | None = None,
                    segment_ids: tuple[jax.Array, jax.Array] | None = None,
                    kv_lengths: jax.Array | None = None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None,
                    score_mod: score_mods.ScoreMod | None = None,
                    return_lse: bool = False) -> jax.Array:
    """Flash attention, q ``[B,T,N,H]``, k ``[B,S,K,H]``, v ``[B,S,K,Hv]`` -> ``[B,T,N,Hv]``
    in q's dtype (``Hv`` may differ from ``H``: MLA's expanded form).

    Same semantics as ``kernels.reference.attention`` (bottom-right aligned masks, segment ids,
    key lengths, zeros for rows that see nothing), differentiable in q, k and v.

    Args:
      mask: a ``kernels.masks.Mask``; ``None`` means ``Full()``. Its tile map decides which
        tiles are skipped (EMPTY), computed without masking (FULL) or masked (PARTIAL).
      segment_ids: ``(q_segment_ids [B,T], kv_segment_ids [B,S])`` int; equal ids attend.
      kv_lengths: ``[B]`` int; keys at or past the length are padding.
      scale: static logit scale, default ``H ** -0.5``.
      block_sizes: tiles; default from ``kernels.block_sizes.default_block_sizes``.
      interpret: run the Pallas interpreter; ``None`` means "iff no GPU is present".
      score_mod: a ``kernels.score_mods`` value (ALiBi, T5 buckets, soft-capping, sinks, a
        user function) applied to the logits of visible pairs inside the kernels; its
        parameters get gradients from the backward kernels (per head, no ``[T, S]`` tensor).
      return_lse: also return each row's natural log-sum-exp ``[B, T, N]`` fp32 (-1e30 for a
        row that sees nothing), differentiable (``kernels.flash_lse``).
    """
    b, t, s, n, kh, h = checks.check_qkv(q, k, v, value_dim=True)
    hv = v.shape[3]
    mask = checks.check_mask(mask)
    checks.check_segment_ids(segment_ids, b, t, s)
    checks.check_kv_lengths(kv_lengths, b)
    checks.check_dtype_and_head_dim(q)
    checks.check_dtype_and_head_dim(v, "v")
    scale = checks.check_scale(scale, h)
    structure, params, sinks = score_mods.split(score_mods.check(score_mod, n), n, tables=True)
    row_tables.check_call(score_mod, b, t, s)
    row_width, col_width = row_tables.width(score_mod)
    group = n // kh
    fold = 1 if col_width else _group_fold(group)  # a column table is per query head
    if block_sizes is None:
        device_kind = "cpu" if interpret else None  # interpret mode uses the CPU entries
        # Tiles sized for the wider of the q/k and v heads (they share the kernel's memory).
        block_sizes = block_sizes_lib.default_block_sizes(max(h, hv), fold, device_kind)
    block_sizes_lib.check_block_sizes(block_sizes)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = _Config(mask=mask, scale=scale, q_len=t, kv_len=s, head_dim=h,
                  head_dim_pad=max(block_sizes_lib.MIN_BLOCK, next_pow2(h)), group=group,
                  fold=fold, blocks=block_sizes_lib.effective_blocks(block_sizes, t, s),
                  has_segments=segment_ids is not None, has_lengths=kv_lengths is not None,
                  interpret=bool(interpret), mod=structure,
                  mod_width=0 if params is None else score_mods.pad_width(params.shape[1]),
                  has_sinks=sinks is not None, row_width=row_width, col_width=col_width,
                  value_dim=0 if hv == h else hv,
                  value_dim_pad=0 if hv == h else max(block_sizes_lib.MIN_BLOCK,
                                                      next_pow2(hv)))
    if segment_ids is not None:
        segment_ids = (jnp.asarray(segment_ids[0]), jnp.asarray(segment_ids[1]))
    if return_lse:  # (out, lse [B, T, N]), both differentiable (ring attention's blocks)
        from tx.kernels import flash_lse  # noqa: PLC0415  (it builds on this module)
        return flash_lse.with_lse(cfg, q, k, v, segment_ids, kv_lengths, params, sinks,
                                  score_mods.tables(score_mod))
    return _flash_jit(cfg, q, k, v, segment_ids, kv_lengths, params, sinks,
                      score_mods.tables(score_mod))


def registry_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None,
                       segment_ids=None, kv_lengths=None, scale=None, bias=None,
                       q_positions=None, kv_positions=None, score_mod=None) -> jax.Array:
    """``flash_attention`` with the signature of ``kernels.reference.attention``, for the
    attention registry: cases it does not express raise ``NotImplementedError`` so the
    registry falls back to the next implementation."""
    if bias is not None:
        raise NotImplementedError("the Pallas kernel takes no dense bias; give a score "
                                  "modifier (kernels.score_mods) instead")
    if q_positions is not None or kv_positions is not None:
        raise NotImplementedError("the Pallas kernel uses bottom-right aligned positions only")
    if q.dtype not in SUPPORTED_DTYPES or \
            max(q.shape[-1], v.shape[-1]) > block_sizes_lib.MAX_HEAD_DIM:
        raise NotImplementedError(f"dtype {q.dtype} / head dims {q.shape[-1]}, {v.shape[-1]} "
                                  "unsupported")
    return flash_attention(q, k, v, mask=mask, segment_ids=segment_ids, kv_lengths=kv_lengths,
                           scale=scale, score_mod=score_mod)
