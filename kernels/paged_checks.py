"""Host-side validation of ``kernels.paged_attention`` arguments, and its ``checkify`` twin for
traced block tables and lengths.

Split from the kernel's file to keep each file short; the public names
(``check_block_tables``) stay importable from ``kernels.paged_attention``. Every error names
the parameter, its value and the fix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from tx.kernels import block_sizes as block_sizes_lib
from tx.kernels import checks
from tx.kernels.common import SUPPORTED_DTYPES, is_int, next_pow2

# Codes of quantised pages, and the dtypes their per-token scales may have.
CODE_DTYPE = jnp.dtype(jnp.int8)
SCALE_DTYPES = tuple(jnp.dtype(d) for d in ("float32", "bfloat16"))


def is_pow2(x: Any) -> bool:
    return is_int(x) and x >= 1 and not x & (x - 1)


def _check_page_dtypes(q, k_pages, v_pages, k_scales, v_scales):
    """Float pages in q's dtype, or int8 codes with ``[K, P, L]`` float32/bfloat16 scales."""
    if (k_scales is None) != (v_scales is None):
        given, missing = ("k_scales", "v_scales") if v_scales is None else ("v_scales",
                                                                            "k_scales")
        raise ValueError(f"{given} is given but {missing}=None: pass both (int8 k_pages and "
                         "v_pages) or neither (float pages).")
    if k_scales is None:
        if CODE_DTYPE in (k_pages.dtype, v_pages.dtype):
            raise ValueError(f"k_pages.dtype={k_pages.dtype}, v_pages.dtype={v_pages.dtype}: "
                             "int8 pages are quantised codes; pass k_scales and v_scales "
                             "([K, P, L] float32 or bfloat16), or dequantise the pages.")
        if not (q.dtype == k_pages.dtype == v_pages.dtype):
            raise ValueError(f"dtypes must match: q.dtype={q.dtype}, k_pages.dtype="
                             f"{k_pages.dtype}, v_pages.dtype={v_pages.dtype}; cast them to "
                             "one dtype.")
        if q.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"q.dtype={q.dtype} is not supported; cast q, k_pages and v_pages "
                             "to float32, bfloat16 or float16.")
        return
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q.dtype={q.dtype} is not supported; cast q to float32, bfloat16 "
                         "or float16.")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dtype != CODE_DTYPE:
            raise ValueError(f"{name}.dtype={x.dtype} must be int8 when k_scales and v_scales "
                             "are given (quantised codes); quantise the pages, or pass "
                             "k_scales=None, v_scales=None for float pages.")
    want = tuple(k_pages.shape[:3])
    for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
        if tuple(getattr(x, "shape", ())) != want or getattr(x, "ndim", None) != 3:
            raise ValueError(f"{name}.shape={getattr(x, 'shape', None)} must be [K, P, L] = "
                             f"{want} (k_pages.shape[:3]): one scale per kv head and token.")
        if x.dtype not in SCALE_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be float32 or bfloat16; use "
                             f"{name}.astype(jnp.float32).")


def check_shapes(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None,
                 value_dim=None):
    """Shapes and dtypes of every argument; returns ``(B, T, N, K, H, P, L, max_pages)``.
    With ``value_dim`` the values are the keys' first columns: no ``v_pages``/``v_scales``."""
    if value_dim is not None:
        checks.check_value_dim(value_dim, getattr(k_pages, "shape", (0,))[-1], v_pages,
                               v_scales)
        v_pages, v_scales = k_pages, k_scales  # checked as the keys are
    if getattr(q, "ndim", None) not in (3, 4):
        raise ValueError(f"q.shape={getattr(q, 'shape', None)} must be [B, N, H] (one new "
                         "token per sequence) or [B, T, N, H] (T new tokens).")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}.shape={getattr(x, 'shape', None)} must be 4-D "
                             "[K, P, L, H]: K kv heads of P pages of L tokens, head dim H.")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages.shape={k_pages.shape} and v_pages.shape={v_pages.shape} "
                         "must match ([K, P, L, H]).")
    b, t, n, h = q.shape if q.ndim == 4 else (q.shape[0], 1, *q.shape[1:])
    kh, p, page, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"head dim k_pages.shape[3]={hk} must equal q.shape[-1]={h}; "
                         "project q, k and v to the same head_dim.")
    if not 1 <= h <= block_sizes_lib.MAX_HEAD_DIM:
        raise ValueError(f"head_dim={h} (q.shape[-1]) must be in [1, "
                         f"{block_sizes_lib.MAX_HEAD_DIM}]; split larger heads.")
    if kh < 1 or n % kh:
        raise ValueError(f"num_heads={n} (q.shape[-2]) must be a multiple of num_kv_heads={kh} "
                         "(k_pages.shape[0]); choose num_kv_heads dividing num_heads.")
    if p < 1:
        raise ValueError(f"k_pages.shape[1]={p} must be >= 1 physical page.")
    if not is_pow2(page):
        raise ValueError(f"page size k_pages.shape[2]={page} must be a power of two "
                         f"(e.g. {next_pow2(page)}); Triton tiles are powers of two.")
    _check_page_dtypes(q, k_pages, v_pages, k_scales, v_scales)
    shape = getattr(block_tables, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != b or shape[1] < 1:
        raise ValueError(f"block_tables.shape={shape} must be [B, max_pages] = [{b}, "
                         "max_pages >= 1] (physical page ids per sequence).")
    if block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables.dtype={block_tables.dtype} must be int32; use "
                         "block_tables.astype(jnp.int32).")
    if getattr(lengths, "shape", None) != (b,):
        raise ValueError(f"lengths.shape={getattr(lengths, 'shape', None)} must be ({b},): "
                         "tokens in each sequence, new ones included.")
    if lengths.dtype != jnp.int32:
        raise ValueError(f"lengths.dtype={lengths.dtype} must be int32; use "
                         "lengths.astype(jnp.int32).")
    return b, t, n, kh, h, p, page, shape[1]


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_values(block_tables, lengths, t, p, page, max_pages):
    """Data checks, when the arrays are concrete (inside a trace they are skipped)."""
    if is_concrete(lengths):
        lens = np.asarray(lengths)
        low = max(1, t)
        bad = np.flatnonzero((lens < low) | (lens > max_pages * page))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"lengths[{i}]={int(lens[i])} must be in [{low}, max_pages * L = "
                             f"{max_pages} * {page} = {max_pages * page}]: every sequence "
                             f"holds its {t} new token(s) and fits its block table; widen "
                             "block_tables or shorten the sequence.")
    if is_concrete(lengths) and is_concrete(block_tables):
        check_block_tables(block_tables, p, lengths=lengths, page_size=page)


def check_block_tables(block_tables, num_pages: int, *, lengths=None, page_size: int = 1,
                       seq_ids=None, name: str = "block_tables") -> None:
    """Host-side (numpy) check that every page a sequence uses is a physical page id in
    ``[0, num_pages)``; raises a ``ValueError`` naming the sequence, the slot and the id.

    A sequence uses the first ``cdiv(lengths[b], page_size)`` entries of its row (every entry
    when ``lengths`` is None); entries past them are never read and may hold anything.
    ``seq_ids`` names the rows in the message (default: the row index).
    """
    ids = np.asarray(block_tables)
    if ids.ndim != 2:
        raise ValueError(f"{name}.shape={ids.shape} must be [B, max_pages] (physical page ids "
                         "per sequence).")
    used = np.ones(ids.shape, bool)
    if lengths is not None:
        pages = -(-np.clip(np.asarray(lengths, np.int64), 0, None) // page_size)
        used = np.arange(ids.shape[1])[None, :] < pages[:, None]
    bad = np.argwhere(used & ((ids < 0) | (ids >= num_pages)))
    if bad.size:
        i, j = (int(x) for x in bad[0])
        seq = i if seq_ids is None else seq_ids[i]
        raise ValueError(f"{name}[{i}, {j}]={int(ids[i, j])}: sequence {seq}, slot {j} names "
                         f"page {int(ids[i, j])}, which is not a page id in [0, num_pages="
                         f"{num_pages}); every page a sequence uses (slots below cdiv(length, "
                         "page_size)) must name a physical page of the pool (slots past it "
                         "are never read). Fix the table or allocate the page first.")


def choose_pages_per_block(pages_per_block, page, max_pages, h, device_kind, interpret):
    """``pages_per_block`` checked, or from the tuning table when None."""
    if pages_per_block is None:
        block_k = block_sizes_lib.default_paged_block_sizes(h, device_kind).block_k
        # Wide enough for a Triton dot (>= 16 keys), no wider than the table needs.
        floor = next_pow2(-(-block_sizes_lib.MIN_BLOCK // page))
        return max(floor, min(max(1, block_k // page), next_pow2(max_pages)))
    if not is_pow2(pages_per_block):
        raise ValueError(f"pages_per_block={pages_per_block!r} must be a power of two >= 1 "
                         "(or None for the tuning table).")
    if not interpret and pages_per_block * page < block_sizes_lib.MIN_BLOCK:
        fix = next_pow2(-(-block_sizes_lib.MIN_BLOCK // page))
        raise ValueError(f"pages_per_block={pages_per_block} * page size {page} must be >= "
                         f"{block_sizes_lib.MIN_BLOCK} keys for a Triton dot; use "
                         f"pages_per_block={fix}.")
    return int(pages_per_block)


def device_checks(block_tables, lengths, *, t, p, page, max_pages):
    """``checkify.check`` versions of ``check_values``, for traced tables and lengths."""
    lens = lengths.astype(jnp.int32)
    low, high = max(1, t), max_pages * page
    bad_len = (lens < low) | (lens > high)
    i = jnp.argmax(bad_len)
    checkify.check(~bad_len.any(), f"lengths[{{i}}]={{n}} must be in [{low}, max_pages * L = "
                   f"{high}]: every sequence holds its {t} new token(s) and fits its block "
                   "table; widen block_tables or shorten the sequence.", i=i, n=lens[i])
    pages = (jnp.clip(lens, 0, None) + page - 1) // page
    used = jnp.arange(max_pages, dtype=jnp.int32)[None, :] < pages[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= p))
    flat = jnp.argmax(bad.reshape(-1))
    row, slot = flat // max_pages, flat % max_pages
    checkify.check(~bad.any(), f"block_tables[{{row}}, {{slot}}]={{page_id}}: sequence {{row}}, "
                   f"slot {{slot}} names a page outside [0, num_pages={p}); the kernel reads "
                   "that page as empty. Fix the table or allocate the page first.",
                   row=row, slot=slot, page_id=block_tables.reshape(-1)[flat])
