"""Per-block visit lists built from a mask's tile map (the "mask info" of splash attention,
the block mask of FlexAttention).

For every query block (forward, dq) or key block (dk/dv: the transposed map) a kernel gets one
int32 row of a *visit table*::

    [num_full, num_total, kv_len, 0, b_0, b_1, ..., b_{num_total-1}, pad...]

``b_0 .. b_{num_full-1}`` are the blocks on the other axis whose tile is FULL (no per-element
masking), ``b_{num_full} .. b_{num_total-1}`` the PARTIAL ones (mask predicate plus bounds);
EMPTY tiles are absent, so they cost neither a load nor a loop iteration. ``kv_len`` is the
number of valid keys of the batch row (``S`` unless ``kv_lengths`` narrows it). Rows are padded
to a power of two (Triton block shapes must be powers of two). A kernel walks its row with
``visit_tiles``.

The static part is host numpy, computed once per (mask, shape, block sizes) and cached. Data
(segment ids, key lengths) narrows it on device with a few ``[B, nq, nk]`` integer ops: a tile
whose query and key segment-id ranges cannot meet, or that lies past ``kv_len``, is dropped; a
FULL tile that they might cut becomes PARTIAL.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tx.kernels import masks as masks_lib
from tx.kernels.common import next_pow2

NUM_FULL, NUM_TOTAL, KV_LEN = 0, 1, 2
HEADER = 4  # header columns before the block ids


def tile_kinds(mask: masks_lib.Mask, q_len: int, kv_len: int, block_q: int,
               block_k: int) -> np.ndarray:
    """``mask.tile_map`` with ragged edge tiles demoted from FULL to PARTIAL: the kernel pads
    T and S to block multiples, and the padding must be masked."""
    kinds = np.array(mask.tile_map(q_len, kv_len, block_q, block_k), dtype=np.int8)
    if q_len % block_q:
        kinds[-1][kinds[-1] == masks_lib.FULL] = masks_lib.PARTIAL
    if kv_len % block_k:
        kinds[:, -1][kinds[:, -1] == masks_lib.FULL] = masks_lib.PARTIAL
    return kinds


def _rank(kinds):
    """Sort key: FULL first, then PARTIAL, EMPTY last (works on numpy and jax arrays)."""
    return 2 - kinds  # FULL=2 -> 0, PARTIAL=1 -> 1, EMPTY=0 -> 2


def _table_width(max_count: int) -> int:
    return next_pow2(HEADER + max(1, max_count))


def _compact_np(kinds: np.ndarray, kv_len: int) -> np.ndarray:
    """``[rows, cols]`` kinds -> ``[rows, width]`` visit table (numpy)."""
    rows, cols = kinds.shape
    num_full = (kinds == masks_lib.FULL).sum(axis=1)
    num_total = (kinds != masks_lib.EMPTY).sum(axis=1)
    width = _table_width(int(num_total.max(initial=0)))
    order = np.argsort(_rank(kinds), axis=1, kind="stable")[:, :width - HEADER]
    table = np.zeros((rows, width), np.int32)
    table[:, NUM_FULL], table[:, NUM_TOTAL], table[:, KV_LEN] = num_full, num_total, kv_len
    table[:, HEADER:HEADER + order.shape[1]] = order
    return table


@functools.lru_cache(maxsize=256)
def _static_table(mask, q_len, kv_len, block_q, block_k, transpose):
    kinds = tile_kinds(mask, q_len, kv_len, block_q, block_k)
    table = _compact_np(kinds.T if transpose else kinds, kv_len)
    table.setflags(write=False)
    return table


def kv_block_lists(mask: masks_lib.Mask, q_len: int, kv_len: int, block_q: int,
                   block_k: int) -> np.ndarray:
    """For each query block, the key blocks it visits: ``[num_q_blocks, width]`` int32."""
    return _static_table(mask, q_len, kv_len, block_q, block_k, False)


def q_block_lists(mask: masks_lib.Mask, q_len: int, kv_len: int, block_q: int,
                  block_k: int) -> np.ndarray:
    """For each key block, the query blocks that see it (the transposed lists, for dk/dv)."""
    return _static_table(mask, q_len, kv_len, block_q, block_k, True)


def visited_tiles(table: np.ndarray) -> int:
    """How many tiles a kernel driven by this table loads (the sum of the list lengths)."""
    return int(np.asarray(table)[..., NUM_TOTAL].sum())


def _block_ranges(ids, block, num_blocks):
    """Per-block ``(min, max)`` of ``ids [B, L]``; the ragged tail repeats the last id."""
    b, length = ids.shape
    pad = num_blocks * block - length
    ids = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
    ids = ids.reshape(b, num_blocks, block)
    return ids.min(axis=-1), ids.max(axis=-1)


def narrowed_table(mask: masks_lib.Mask, q_len: int, kv_len: int, block_q: int, block_k: int,
                   *, transpose: bool, segment_ids=None, kv_lengths=None) -> jax.Array:
    """The visit table narrowed by data: ``[B, rows, width]`` int32 (traceable).

    Without data it is the static table with a leading batch dim of 1.
    """
    static = _static_table(mask, q_len, kv_len, block_q, block_k, transpose)
    if segment_ids is None and kv_lengths is None:
        return jnp.asarray(static)[None]
    kinds = jnp.asarray(tile_kinds(mask, q_len, kv_len, block_q, block_k))  # [nq, nk]
    nq, nk = kinds.shape
    batch = (segment_ids[0] if segment_ids is not None else kv_lengths).shape[0]
    kinds = jnp.broadcast_to(kinds[None], (batch, nq, nk))
    lengths = jnp.full((batch,), kv_len, jnp.int32)
    if kv_lengths is not None:
        lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, kv_len)
        starts = jnp.arange(nk, dtype=jnp.int32)[None, None, :] * block_k
        past = starts >= lengths[:, None, None]
        cut = starts + block_k > lengths[:, None, None]
        kinds = jnp.where(past, masks_lib.EMPTY,
                          jnp.where(cut, jnp.minimum(kinds, masks_lib.PARTIAL), kinds))
    if segment_ids is not None:
        q_lo, q_hi = _block_ranges(segment_ids[0], block_q, nq)   # [B, nq]
        k_lo, k_hi = _block_ranges(segment_ids[1], block_k, nk)   # [B, nk]
        q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
        k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]
        apart = (q_hi < k_lo) | (k_hi < q_lo)
        one_segment = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        kinds = jnp.where(apart, masks_lib.EMPTY,
                          jnp.where(one_segment, kinds, jnp.minimum(kinds, masks_lib.PARTIAL)))
    kinds = kinds.astype(jnp.int32)
    if transpose:
        kinds = kinds.transpose(0, 2, 1)
    width = static.shape[1]  # narrowing never lengthens a list
    order = jnp.argsort(_rank(kinds), axis=-1, stable=True)[..., :width - HEADER]
    order = order.astype(jnp.int32)
    rows = kinds.shape[1]
    header = jnp.stack([(kinds == masks_lib.FULL).sum(-1).astype(jnp.int32),
                        (kinds != masks_lib.EMPTY).sum(-1).astype(jnp.int32),
                        jnp.broadcast_to(lengths[:, None], (batch, rows)),
                        jnp.zeros((batch, rows), jnp.int32)], axis=-1)
    pad = width - HEADER - order.shape[-1]
    return jnp.concatenate([header, jnp.pad(order, ((0, 0), (0, 0), (0, pad)))], axis=-1)


def visit_tiles(table_ref, visit, carry):
    """Walks one row of a visit table inside a kernel: ``visit(block, carry, masked)`` for each
    listed block, the FULL ones first with ``masked=False`` (no per-element masking), then the
    PARTIAL ones with ``masked=True``; returns the last carry.

    ``table_ref`` is the program's row (``[width]`` int32). Both loops have dynamic bounds, so
    EMPTY tiles (absent from the list) cost no iteration; ``masked`` is static, so each loop
    body is traced once, with or without the mask.
    """
    def body(masked):
        return lambda i, carry: visit(table_ref[HEADER + i], carry, masked)

    num_full, num_total = table_ref[NUM_FULL], table_ref[NUM_TOTAL]
    carry = lax.fori_loop(0, num_full, body(False), carry)
    return lax.fori_loop(num_full, num_total, body(True), carry)
