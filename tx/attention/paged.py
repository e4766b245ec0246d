"""A paged KV cache for the attention layer: K/V live in fixed-size pages of a shared pool.

The host-side page manager (``tx.inference.paged_cache``) decides which physical pages each
sequence uses; this module holds the device side: the page pool ``[P, L, K, H]``, the block
tables ``[B, max_pages]`` and the number of tokens written. ``update`` scatters new K/V into
their pages and returns the gathered view, so every registry implementation can attend over
it; ``attend_pages`` is the fast path through the Pallas paged-decode kernel, which reads the
pages in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import masks as masks_lib
from kernels.paged_attention import paged_attention
from tx.parallel import per_shard

_paged_per_shard = per_shard.paged(paged_attention)  # the kernel per shard under a mesh


class PagedKVCache(nnx.Module):
    """Pages ``[P, L, K, H]`` addressed through ``block_tables [B, max_pages]``."""

    def __init__(self, block_tables, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype=jnp.float32):
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # Pages split by K/V head under a mesh; tables by sequence (see tx.parallel.per_shard).
        names = (None, None, "kv_heads", "head_dim")
        self.k_pages = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names,
                                 eager_sharding=False)
        self.v_pages = nnx.Cache(jnp.zeros(shape, dtype), out_sharding=names,
                                 eager_sharding=False)
        self.block_tables = nnx.Cache(jnp.asarray(block_tables, jnp.int32),
                                      out_sharding=("batch", None), eager_sharding=False)
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))
        self.page_size = page_size

    def _write(self, k_new, v_new):
        b, t = k_new.shape[:2]
        pos = self.index[...] + jnp.arange(t, dtype=jnp.int32)  # [T]
        pages = self.block_tables[...][:, pos // self.page_size]  # [B, T]
        offsets = jnp.broadcast_to(pos % self.page_size, (b, t))
        dtype = self.k_pages[...].dtype
        # Rows sharing a prefix page write identical K/V there (same tokens, same positions).
        self.k_pages[...] = self.k_pages[...].at[pages, offsets].set(k_new.astype(dtype))
        self.v_pages[...] = self.v_pages[...].at[pages, offsets].set(v_new.astype(dtype))
        self.index[...] = self.index[...] + t

    def update(self, k_new, v_new):
        """Writes the new tokens; returns the gathered ``(k, v, q_positions, kv_positions)``."""
        b, t = k_new.shape[:2]
        self._write(k_new, v_new)
        tables = self.block_tables[...]
        _, page, kh, h = self.k_pages[...].shape
        s = tables.shape[1] * page
        k = self.k_pages[...][tables].reshape(b, s, kh, h)
        v = self.v_pages[...][tables].reshape(b, s, kh, h)
        slots = jnp.arange(s, dtype=jnp.int32)
        end = self.index[...]
        kv_pos = jnp.broadcast_to(jnp.where(slots < end, slots, -1), (b, s))
        q_pos = jnp.broadcast_to(end - t + jnp.arange(t, dtype=jnp.int32), (b, t))
        return k, v, q_pos, kv_pos

    def attend_pages(self, q_btnh, k_new, v_new, mask: masks_lib.Mask):
        """Writes the new tokens and attends with the Pallas paged kernel (no gather)."""
        self._write(k_new, v_new)
        lengths = jnp.full((q_btnh.shape[0],), self.index[...], jnp.int32)
        return _paged_per_shard(q_btnh, self.k_pages[...], self.v_pages[...],
                                self.block_tables[...], lengths, mask=mask)
