"""Paged attention for decode in portable Pallas: block tables, native GQA, window page
skipping and split-K (flash-decoding).

Algorithm: PagedAttention (Kwon et al., 2023, arXiv:2309.06180): the KV cache lives in a pool
of fixed-size physical pages ``[K, P, L, H]``; a sequence's ``block_tables`` row maps its
logical pages to physical ones. The pool is K/V-head major so that one head's page is one
contiguous ``[L, H]`` block: a program's page loads are whole blocks, and the gathering
``xla`` path gets ``[K, B, S, H]``, which feeds its dots without a transpose. The kernel walks
those pages with the online softmax of FlashAttention (fp32 accumulation), and for long
contexts with few sequences splits a sequence's pages over ``split_k`` programs whose partial
outputs are merged with their log-sum-exp (Flash-Decoding, Dao et al., 2023).

Layout. A program handles one (batch row, K/V head, split). The ``G = N / K`` query heads of
the group and the ``T`` new tokens are folded into the rows of its q tile, ``[R, H]`` with row
``r`` = (token ``r // G``, head ``r % G``), so each page is read once for all of them and K/V
are never repeated. Rows are padded to a power of two >= 16 (Triton dot shapes).

Which pages a program reads. The new tokens sit at positions ``length - T .. length - 1``
(bottom-right aligned). For a banded mask (``mask.band() = (lo, hi)``: causal, sliding window)
the visible keys lie in ``[length - T + lo, length - 1 + hi]``; ``page_bounds`` turns that into
a page range per sequence on device, from ``lengths``, so pages wholly outside the window and
pages past the sequence's length cost neither a load nor a loop iteration (dynamic loop
bound). Other masks visit every page up to the length. Inside the range, each loop iteration
loads ``pages_per_block`` pages; slots past the range are redirected to the range's last page
(already in cache) and masked, so no page outside the range is ever read.

Bad page ids. Concrete block tables are checked on the host (``check_block_tables``). A traced
one cannot raise, so an id outside ``[0, P)`` marks its page *empty*: its keys are masked and
its values zeroed, exactly as if those positions were past the sequence's length; clamping it
instead would read (leak) another sequence's page. The load itself stays clamped in bounds.
``checked_paged_attention`` (also ``paged_attention.checked``) adds ``checkify`` checks of the
traced tables and lengths for debugging. The host-side checks live in ``kernels.paged_checks``.

Quantised pages. With ``k_scales``/``v_scales`` the pages hold int8 codes and a scale per
(kv head, token): key = ``code * scale``. The kernel reads the codes (a quarter of fp32's bytes,
half of bf16's: decode is bound by those reads) and dequantises in registers. K's scale is
per key, i.e. per logit column, so it is folded into the logits, ``s = (q @ codes^T) *
k_scale``, and the codes enter the dot as exact small integers in q's dtype; V's codes are
scaled before ``p @ v``, because the softmax sum ``l`` must not see V's scale.

Score modifiers (``kernels.score_mods``) change each logit at (query position, key position)
in registers; a sink joins split 0 only, so the log-sum-exp merge counts it once.

Reference: ``kernels.reference.paged_attention`` (gather the pages, then dense attention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify
from jax.experimental import pallas as pl

from tx.kernels import block_sizes as block_sizes_lib
from tx.kernels import checks
from tx.kernels import masks as masks_lib
from tx.kernels import online_softmax
from tx.kernels import score_mods
from tx.kernels.common import compiler_params, is_int, next_pow2
from tx.kernels.online_softmax import LOG2E
from tx.kernels.online_softmax import dot as _dot
from tx.kernels.online_softmax import precision as _precision
# Re-exported: callers import the validation from here.
from tx.kernels.paged_checks import (check_block_tables, check_shapes, check_values,
                                  choose_pages_per_block, device_checks)

__all__ = ["paged_attention", "checked_paged_attention", "check_block_tables", "page_bounds",
           "visited_pages"]

# Columns of the per-(sequence, split) meta row the kernel reads.
_START, _STOP, _LENGTH = 0, 1, 2
_META_WIDTH = 4  # a power of two for Triton


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it keys jit)."""

    mask: masks_lib.Mask
    scale: float
    q_len: int            # T
    group: int            # G = N / K
    page_size: int        # L
    max_pages: int        # block_tables.shape[1]
    table_width: int      # max_pages padded for block loads (a power of two)
    head_dim: int         # H as given
    head_dim_pad: int     # H padded to a power of two >= 16
    rows: int             # T * G padded to a power of two >= 16
    pages_per_block: int
    split_k: int
    out_dtype: Any
    squeeze: bool         # q was [B, N, H]
    quantised: bool       # int8 pages with k/v scales ``[K, P, L]``
    interpret: bool
    num_warps: int | None
    num_stages: int
    mod: Any = None       # tree structure of the score modifier (kernels.score_mods), or None
    mod_width: int = 0    # its parameter columns per head, padded to a power of two
    has_sinks: bool = False
    value_dim: int = 0    # > 0: no V pages, the values are K's first value_dim columns

    @property
    def kv_len(self) -> int:
        """The static key length the mask sees: ``max_pages * L``."""
        return self.max_pages * self.page_size


# --- page ranges -------------------------------------------------------------------------------

def page_bounds(mask: masks_lib.Mask | None, lengths: jax.Array, q_len: int,
                page_size: int) -> tuple[jax.Array, jax.Array]:
    """``(first, stop)`` int32 ``[B]``: the logical pages ``[first, stop)`` that the last
    ``q_len`` tokens of each sequence can see. Traceable; the kernel's loop bounds.

    ``stop`` never passes the sequence's last page; for a banded mask the range also shrinks
    to the window of the new tokens (``lo <= kv_pos - q_pos <= hi``). It is empty
    (``first == stop``) when no key is visible.
    """
    mask = checks.check_mask(mask)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    num_pages = (lengths + page_size - 1) // page_size
    first, stop = jnp.zeros_like(num_pages), num_pages
    band = mask.band()
    if band is not None:
        lo, hi = band
        if math.isfinite(lo):  # earliest key the first new token sees
            first = jnp.maximum(lengths - q_len + int(lo), 0) // page_size
        if math.isfinite(hi):  # latest key the last new token sees
            last = jnp.minimum(lengths - 1 + int(hi), lengths - 1)
            stop = jnp.floor_divide(last, page_size) + 1
    first = jnp.clip(first, 0, num_pages)
    stop = jnp.clip(stop, first, num_pages)
    return first, stop


def visited_pages(mask: masks_lib.Mask | None, lengths: Any, q_len: int,
                  page_size: int) -> int:
    """Pages the kernel loads per K/V head over the batch (the sum of its loop ranges)."""
    first, stop = page_bounds(mask, lengths, q_len, page_size)
    return int(jnp.sum(stop - first))


def _split_meta(cfg: _Config, lengths: jax.Array) -> jax.Array:
    """``[B, split_k, 4]`` int32 rows ``(start, stop, length, 0)``: split ``s`` of a sequence
    walks pages ``[start, stop)``, an equal share of its compute blocks (possibly none)."""
    first, stop = page_bounds(cfg.mask, lengths, cfg.q_len, cfg.page_size)   # [B]
    ppb = cfg.pages_per_block
    num_blocks = (stop - first + ppb - 1) // ppb
    per_split = (num_blocks + cfg.split_k - 1) // cfg.split_k                # blocks
    s = jnp.arange(cfg.split_k, dtype=jnp.int32)[None, :]                    # [1, S]
    lo = jnp.minimum(first[:, None] + s * per_split[:, None] * ppb, stop[:, None])
    hi = jnp.minimum(lo + per_split[:, None] * ppb, stop[:, None])
    length = jnp.broadcast_to(lengths[:, None], lo.shape)
    return jnp.stack([lo, hi, length, jnp.zeros_like(lo)], axis=-1).astype(jnp.int32)


# --- the kernel --------------------------------------------------------------------------------

def _split_refs(cfg: _Config, refs):
    """``(k_scales, v_scales, params, sinks, o, lse)`` refs; absent inputs are None."""
    refs = list(refs)
    ks_ref = refs.pop(0) if cfg.quantised else None
    vs_ref = refs.pop(0) if cfg.quantised and not cfg.value_dim else None
    params_ref = refs.pop(0) if cfg.mod_width else None
    sinks_ref = refs.pop(0) if cfg.has_sinks else None
    return (ks_ref, vs_ref, params_ref, sinks_ref, *refs)


def _initial(cfg: _Config, sinks_ref, rows):
    """Running max and sum a row starts from; the sink (if any) joins split 0 only, so the
    merge of the splits counts it once."""
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    if sinks_ref is None:
        return m, l
    first = pl.program_id(2) == 0
    return jnp.where(first, sinks_ref[...] * LOG2E, m), jnp.where(first, 1.0, l)


def _latent_kernel(meta_ref, table_ref, q_ref, k_ref, *refs, cfg: _Config, precision):
    """``_paged_kernel`` over pages whose first ``value_dim`` key columns are the values (MLA's
    latent ``[c_kv, k_rope]``): one read of each page serves both."""
    _paged_kernel(meta_ref, table_ref, q_ref, k_ref, None, *refs, cfg=cfg, precision=precision)


def _paged_kernel(meta_ref, table_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, precision):
    # Quantised pages bring their scale refs (``[P, L]`` of this kv head), a score modifier
    # its per-row parameters and sinks, before the outputs.
    ks_ref, vs_ref, params_ref, sinks_ref, o_ref, lse_ref = _split_refs(cfg, refs)
    ppb, page = cfg.pages_per_block, cfg.page_size
    block_k = ppb * page
    rows, hp = q_ref.shape
    start, stop, length = meta_ref[_START], meta_ref[_STOP], meta_ref[_LENGTH]
    q = q_ref[...]                                                         # [rows, Hp]
    t_idx = lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // cfg.group     # [rows, 1]
    q_pos = length - cfg.q_len + t_idx                                     # bottom-right
    real_row = t_idx < cfg.q_len
    qk_scale = cfg.scale * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))
    if cfg.mod is not None:  # row r is query head kv_head * G + r % G
        row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        ctx = functools.partial(
            score_mods.Context, batch=pl.program_id(0),
            head=pl.program_id(1) * cfg.group + row % cfg.group, q_pos=q_pos,
            params=params_ref[...] if cfg.mod_width else None, in_kernel=True)
        modifier = score_mods.rebuild(cfg.mod)

    def read(ids):
        """K, V (``[..., L, Hp]``) and K's per-key scales (``[1, block_k]``, None for float
        pages) of pages ``ids`` (a scalar or ``[ppb]``). Int8 codes become q's dtype (exact:
        |code| <= 128); V is dequantised here, K's scale is folded into the logits."""
        if cfg.value_dim:
            return _read_latent(ids)
        k, v = k_ref[ids], v_ref[ids]
        if not cfg.quantised:
            return k, v, None
        v_scale = vs_ref[ids].astype(jnp.float32)[..., None]               # [..., L, 1]
        v = (v.astype(jnp.float32) * v_scale).astype(q.dtype)
        k_scale = ks_ref[ids].astype(jnp.float32).reshape(1, block_k)
        return k.astype(q.dtype), v, k_scale

    def _read_latent(ids):
        """K and V from the same page: V is K with the columns past ``value_dim`` zeroed (the
        accumulator keeps the key's width; the caller slices the output), dequantised with
        K's scales."""
        k = k_ref[ids]
        col = lax.broadcasted_iota(jnp.int32, k.shape, k.ndim - 1)
        if not cfg.quantised:
            return k, jnp.where(col < cfg.value_dim, k, 0), None
        scale = ks_ref[ids].astype(jnp.float32)
        v = k.astype(jnp.float32) * scale[..., None]
        v = jnp.where(col < cfg.value_dim, v, 0).astype(q.dtype)
        return k.astype(q.dtype), v, scale.reshape(1, block_k)

    def load(first):
        """K and V of pages ``first .. first + ppb - 1`` (``[block_k, Hp]`` each, V zeroed
        on empty pages), K's scales (or None) and which keys lie on a real page
        (``[1, block_k]`` or a scalar).

        Table entries are ``-1`` for an out-of-range page id (see ``_paged_jit``): such a page
        is loaded from page 0, to stay in bounds, and then masked as empty."""
        if ppb == 1:
            page_id = table_ref[first]
            real = page_id >= 0
            k, v, k_scale = read(jnp.maximum(page_id, 0))                 # [L, Hp]
            return k, jnp.where(real, v, 0), k_scale, real
        slots = first + lax.broadcasted_iota(jnp.int32, (ppb,), 0)
        # Slots past the range re-read its last page (masked below): never a foreign page.
        ids = jnp.where(slots < stop, table_ref[pl.ds(first, ppb)], table_ref[stop - 1])
        real = ids >= 0                                                    # [ppb]
        k, v, k_scale = read(jnp.maximum(ids, 0))
        k = k.reshape(block_k, hp)                                         # [ppb * L, Hp]
        # Zeroed V keeps a masked page's garbage (even NaN, or a NaN scale) out of p @ v.
        v = jnp.where(real[:, None, None], v, 0).reshape(block_k, hp)
        real_key = jnp.broadcast_to(real[:, None], (ppb, page)).reshape(1, block_k)
        return k, v, k_scale, real_key

    def visit(i, carry):
        m_prev, l_prev, acc = carry
        first = start + i * ppb
        k, v, k_scale, real_key = load(first)
        # A partly written page's tail (stale, even NaN) stays out of p @ v.
        written = first * page + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < length
        v = jnp.where(written, v, 0)
        # A NaN logit from an empty page's scale is replaced by -inf below.
        kv_pos = first * page + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        if cfg.mod is None:
            logit_scale = qk_scale if k_scale is None else k_scale * qk_scale
            s = _dot(q, k, (1, 1), precision) * logit_scale                # [rows, block_k]
        else:  # the modifier sees natural-unit logits
            logit_scale = cfg.scale if k_scale is None else k_scale * cfg.scale
            s = _dot(q, k, (1, 1), precision) * logit_scale
            s = modifier.modify(s, ctx(kv_pos=kv_pos)) * LOG2E
        keep = cfg.mask.predicate(q_pos, kv_pos, cfg.kv_len)
        keep = keep & real_row & real_key & (kv_pos < length) & (kv_pos < stop * page)
        s = jnp.where(keep, s, -jnp.inf)
        return online_softmax.update(m_prev, l_prev, acc, s, v, precision)

    carry = (*_initial(cfg, sinks_ref, rows), jnp.zeros((rows, hp), jnp.float32))
    num_iters = jnp.maximum(stop - start + ppb - 1, 0) // ppb
    m, l, acc = lax.fori_loop(0, num_iters, visit, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)  # acc is 0 where nothing seen
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), -jnp.inf)         # base 2


def _row_inputs(cfg: _Config, kh: int, params, sinks):
    """Modifier parameters ``[K, rows, W]`` and sinks ``[K, rows]`` laid out per q-tile row
    (row ``t * G + g`` is head ``kv_head * G + g``), with their specs."""
    args, specs = [], []
    pad_rows = cfg.rows - cfg.q_len * cfg.group
    if cfg.mod_width:
        w = cfg.mod_width
        p = jnp.pad(params, ((0, 0), (0, w - params.shape[1]))).reshape(kh, cfg.group, w)
        args.append(jnp.pad(jnp.tile(p, (1, cfg.q_len, 1)), ((0, 0), (0, pad_rows), (0, 0))))
        specs.append(pl.BlockSpec((None, cfg.rows, w), lambda b, h, s: (h, 0, 0)))
    if cfg.has_sinks:
        x = jnp.tile(sinks.reshape(kh, cfg.group), (1, cfg.q_len))
        args.append(jnp.pad(x, ((0, 0), (0, pad_rows))))
        specs.append(pl.BlockSpec((None, cfg.rows), lambda b, h, s: (h, 0)))
    return args, specs


def _paged_call(cfg: _Config, meta, table, q_f, k_pages, v_pages, k_scales, v_scales,
                params=None, sinks=None):
    b, kh, rows, hp = q_f.shape
    p, page = k_pages.shape[1:3]
    # One partial output per split; fp32 when they still have to be merged.
    o_dtype = jnp.float32 if cfg.split_k > 1 else q_f.dtype
    kv_spec = pl.BlockSpec((None, p, page, hp), lambda b, h, s: (h, 0, 0, 0))
    # Quantised pages: this kv head's scales of every page, read like its codes.
    scale_spec = pl.BlockSpec((None, p, page), lambda b, h, s: (h, 0, 0))
    scales = [k_scales, v_scales] if cfg.quantised else []
    pages = [k_pages, v_pages]
    body = _paged_kernel
    if cfg.value_dim:  # values are the keys' first columns: no V pages, no V scales
        pages, scales, body = [k_pages], scales[:1], _latent_kernel
    extra, extra_specs = _row_inputs(cfg, kh, params, sinks)
    kernel = functools.partial(body, cfg=cfg, precision=_precision(q_f.dtype))
    return pl.pallas_call(
        kernel, grid=(b, kh, cfg.split_k),
        in_specs=[pl.BlockSpec((None, None, _META_WIDTH), lambda b, h, s: (b, s, 0)),
                  pl.BlockSpec((None, cfg.table_width), lambda b, h, s: (b, 0)),
                  pl.BlockSpec((None, None, rows, hp), lambda b, h, s: (b, h, 0, 0)),
                  *[kv_spec for _ in pages], *[scale_spec for _ in scales], *extra_specs],
        out_specs=[pl.BlockSpec((None, None, None, rows, hp), lambda b, h, s: (s, b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((cfg.split_k, b, kh, rows, hp), o_dtype),
                   jax.ShapeDtypeStruct((cfg.split_k, b, kh, rows), jnp.float32)],
        compiler_params=compiler_params(cfg.interpret, cfg), interpret=cfg.interpret,
        name="paged_attention",
    )(meta, table, q_f, *pages, *scales, *extra)


def _merge_splits(o_s, lse_s):
    """Flash-decoding epilogue: ``[S, ..., R, Hp]`` partials weighted by ``exp2(lse)``."""
    m = lse_s.max(axis=0)                                                  # [B, K, R]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse_s - m[None])                                          # 0 for empty splits
    den = w.sum(axis=0)
    num = (w[..., None] * o_s).sum(axis=0)
    return num / jnp.where(den > 0, den, 1.0)[..., None]  # rows nobody sees stay 0


# --- layouts -----------------------------------------------------------------------------------

def _fold_rows(cfg: _Config, q_btnh):
    """``[B,T,N,H]`` -> ``[B, K, R, Hp]`` with row ``t * G + g``."""
    b, t, n, h = q_btnh.shape
    kh = n // cfg.group
    q = q_btnh.reshape(b, t, kh, cfg.group, h).transpose(0, 2, 1, 3, 4)
    q = q.reshape(b, kh, t * cfg.group, h)
    return jnp.pad(q, ((0, 0), (0, 0), (0, cfg.rows - t * cfg.group),
                       (0, cfg.head_dim_pad - h)))


def _unfold_rows(cfg: _Config, o_f):
    b, kh = o_f.shape[:2]
    t, g, h = cfg.q_len, cfg.group, cfg.value_dim or cfg.head_dim
    o = o_f[:, :, :t * g, :h].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, t, kh * g, h).astype(cfg.out_dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def _paged_jit(cfg: _Config, q, k_pages, v_pages, block_tables, lengths, k_scales=None,
               v_scales=None, params=None, sinks=None):
    if cfg.squeeze:
        q = q[:, None]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, cfg.kv_len)
    # A traced table may hold ids outside [0, P): -1 marks such a page empty for the kernel
    # (masked, never clamped onto another sequence's page). The padding is never visited
    # (loop bounds stop at the sequence's last page).
    num_pages = k_pages.shape[1]
    table = block_tables.astype(jnp.int32)
    table = jnp.where((table >= 0) & (table < num_pages), table, -1)
    table = jnp.pad(table, ((0, 0), (0, cfg.table_width - cfg.max_pages)))
    h = cfg.head_dim
    if cfg.head_dim_pad != h:  # copies the pool: use head dims that are powers of two >= 16
        pad = ((0, 0), (0, 0), (0, 0), (0, cfg.head_dim_pad - h))
        k_pages = jnp.pad(k_pages, pad)
        v_pages = None if v_pages is None else jnp.pad(v_pages, pad)
    meta = _split_meta(cfg, lengths)
    o_s, lse_s = _paged_call(cfg, meta, table, _fold_rows(cfg, q), k_pages, v_pages,
                             k_scales, v_scales, params, sinks)
    o_f = o_s[0] if cfg.split_k == 1 else _merge_splits(o_s, lse_s)
    out = _unfold_rows(cfg, o_f)
    return out[:, 0] if cfg.squeeze else out


# --- public API --------------------------------------------------------------------------------

def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    mask: masks_lib.Mask | None = None, scale: float | None = None,
                    split_k: int | None = None, pages_per_block: int | None = None,
                    interpret: bool | None = None, k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None,
                    score_mod: score_mods.ScoreMod | None = None,
                    value_dim: int | None = None) -> jax.Array:
    """Attention of a few new tokens per sequence over a paged KV cache.

    Args:
      q: ``[B, N, H]`` (one new token per sequence) or ``[B, T, N, H]``; the ``T`` new tokens
        sit at positions ``lengths - T .. lengths - 1``.
      k_pages, v_pages: ``[K, P, L, H]``: each kv head's ``P`` physical pages of ``L`` tokens
        (``L`` a power of two), in q's dtype, or int8 codes when ``k_scales``/``v_scales`` are
        given.
      block_tables: ``[B, max_pages]`` int32; logical page ``j`` of sequence ``b`` is physical
        page ``block_tables[b, j]``. Entries at or past ``cdiv(lengths[b], L)`` are never read.
        An id outside ``[0, P)`` raises a ValueError; under ``jit`` (unchecked) it reads as an
        empty page (``checked_paged_attention`` reports it).
      lengths: ``[B]`` int32 tokens in each sequence, the new ones included.
      mask: a ``kernels.masks.Mask`` (``None``: ``Full()``), evaluated at (query position, key
        position, ``kv_len = max_pages * L``). Banded masks (causal, ``Local``) skip the pages
        outside the window of the new tokens.
      scale: static logit scale, default ``H ** -0.5``.
      split_k: programs per (sequence, kv head) that share its pages (flash-decoding); their
        partial results are merged by log-sum-exp. ``None``: from the tuning table (1 in
        interpret mode).
      pages_per_block: pages loaded per loop iteration; ``None``: from the tuning table.
      interpret: run the Pallas interpreter; ``None`` means "iff no GPU is present".
      k_scales, v_scales: ``[K, P, L]`` float32 or bfloat16, both or neither: int8 pages hold
        symmetric codes, key ``k = k_pages.astype(f32) * k_scales[..., None]`` (V likewise);
        the kernel dequantises them in registers.
      score_mod: a ``kernels.score_mods`` value applied to the logits at (query position,
        key position) inside the kernel: ALiBi, T5 buckets, soft-capping, sinks, a function.
      value_dim: the values are the first ``value_dim`` columns of the keys (MLA's latent
        pages ``[c_kv, k_rope]``, stored once per token): pass ``v_pages=None`` (and no
        ``v_scales``); int8 values are scaled by ``k_scales``. Each page is read once.

    Returns:
      ``[B, N, H]`` or ``[B, T, N, H]`` (q's shape and dtype; the last dim ``value_dim`` when
      given); rows that see no key are zero.
    """
    b, t, n, kh, h, p, page, max_pages = check_shapes(q, k_pages, v_pages, block_tables,
                                                      lengths, k_scales, v_scales, value_dim)
    mask = checks.check_mask(mask)
    check_values(block_tables, lengths, t, p, page, max_pages)
    scale = checks.check_scale(scale, h)
    structure, params, sinks = score_mods.split(score_mods.check(score_mod, n), n)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    device_kind = "cpu" if interpret else None  # interpret mode uses the CPU entries
    ppb = choose_pages_per_block(pages_per_block, page, max_pages, h, device_kind, interpret)
    num_blocks = -(-max_pages // ppb)
    if split_k is None:
        split_k = block_sizes_lib.default_split_k(b * kh, num_blocks, device_kind)
    elif not is_int(split_k) or split_k < 1:
        raise ValueError(f"split_k={split_k!r} must be an integer >= 1 (1 = no split), or "
                         "None for the tuning table.")
    tiles = block_sizes_lib.default_paged_block_sizes(h, device_kind)
    cfg = _Config(mask=mask, scale=scale, q_len=t, group=n // kh, page_size=page,
                  max_pages=max_pages, table_width=next_pow2(max_pages + ppb - 1),
                  head_dim=h, head_dim_pad=max(block_sizes_lib.MIN_BLOCK, next_pow2(h)),
                  rows=max(block_sizes_lib.MIN_BLOCK, next_pow2(t * (n // kh))),
                  pages_per_block=ppb, split_k=int(split_k), out_dtype=jnp.dtype(q.dtype),
                  squeeze=q.ndim == 3, quantised=k_scales is not None,
                  interpret=bool(interpret), num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages, mod=structure,
                  mod_width=0 if params is None else score_mods.pad_width(params.shape[1]),
                  has_sinks=sinks is not None, value_dim=int(value_dim or 0))
    return _paged_jit(cfg, q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales,
                      params, sinks)


# --- debug mode: checkify ----------------------------------------------------------------------

def checked_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables: jax.Array, lengths: jax.Array,
                            **kwargs) -> tuple[checkify.Error, jax.Array]:
    """``paged_attention`` in debug mode: ``(err, out)``, where ``err`` is a
    ``jax.experimental.checkify.Error`` holding the first bad block-table entry or length.

    Under ``jit`` the host-side value checks cannot see traced tables, and the kernel then
    reads an out-of-range page as empty; this wrapper (usable inside ``jit``) records the bad
    entry instead: return ``err`` from the jitted function and call ``err.throw()`` outside.
    Only the checks go through ``checkify``, so the Pallas kernel is traced as usual.
    """
    _, t, _, _, _, p, page, max_pages = check_shapes(
        q, k_pages, v_pages, block_tables, lengths, kwargs.get("k_scales"),
        kwargs.get("v_scales"), kwargs.get("value_dim"))
    checks_fn = functools.partial(device_checks, t=t, p=p, page=page, max_pages=max_pages)
    err, _ = checkify.checkify(checks_fn)(block_tables, lengths)
    return err, paged_attention(q, k_pages, v_pages, block_tables, lengths, **kwargs)


# ``kernels.paged_attention`` is this function (the package exports the op under its module's
# name), so the debug mode hangs off it: ``kernels.paged_attention.checked(...)``.
paged_attention.checked = checked_paged_attention
