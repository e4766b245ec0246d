"""A paged KV cache for the attention layer: K/V live in fixed-size pages of a shared pool.

The host-side page manager (``tx.inference.paged_cache``) decides which physical pages each
sequence uses; this module holds the device side: the page pool ``[K, P, L, H]`` (K/V-head
major, so a head's page is one contiguous block: see ``kernels.paged_attention``), the block
tables ``[B, max_pages]`` and the number of tokens written. ``attend`` scatters new K/V into
their pages and attends: through a paged kernel that reads the pages in place (``pallas``: the
Pallas paged-decode kernel) when the layer's implementation list names one, else over the
gathered pages like any registry implementation (``update`` returns that gathered view).

Forking (beam search, parallel sampling) follows the page pool's plan: after the prompts are
prefilled once, ``fork`` switches to the forked rows' block tables, whose full prompt pages are
shared (stored once) and whose partly filled prompt page was copied for each fork
(copy-on-write); ``reorder`` then copies only the pages a row owns, from ``private_from`` on.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.kernels import masks as masks_lib
from tx.kernels.paged_attention import check_block_tables
from tx.attention import cache as cache_lib
from tx.attention import calls, quant, registry
from tx.config import DEFAULT_IMPLEMENTATION


def copy_page_pairs(k_pages: jax.Array, v_pages: jax.Array, src: jax.Array,
                    dst: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Copies pages ``src[i] -> dst[i]`` of ``[K, P, L, H]`` pools; every page is read before
    any is written, so pairs may swap pages. A destination listed twice must get the same
    contents each time (an unchanged shared page)."""
    return k_pages.at[:, dst].set(k_pages[:, src]), v_pages.at[:, dst].set(v_pages[:, src])


@dataclasses.dataclass(frozen=True)
class ForkPlan:
    """What ``fork`` switches to, as the host-side ``PagePool`` planned it.

    Attributes:
      block_tables: int32 ``[B * n, max_pages]`` of the forked rows (row ``b * n + j`` is the
        ``j``-th fork of prompt row ``b``).
      copies: int32 ``[C, 2]`` ``(src_page, dst_page)`` copy-on-write copies of shared, partly
        filled pages, applied once the prompts are written.
      private_from: first block-table column whose pages each forked row owns alone; earlier
        columns hold shared (read-only) prompt pages.
    """

    block_tables: np.ndarray
    copies: np.ndarray
    private_from: int


def _pool(scheme, shape: tuple, dtype) -> dict:
    """Empty ``[K, P, L, H]`` storage of ``scheme`` (``tx.attention.quant``): one cache per
    part, each ``[K, P, ...]``."""
    return nnx.data({name: _kv_major(part)
                     for name, part in quant.zeros(scheme, shape, dtype).items()})


def _kv_major(x: jax.Array, *names) -> nnx.Cache:
    """A cache array split by K/V head (its leading axis) under a mesh, then by ``names``; the
    block tables split by sequence (see ``tx.parallel.per_shard``)."""
    names = ("kv_heads", *names)
    return nnx.Cache(x, out_sharding=names + (None,) * (x.ndim - len(names)),
                     eager_sharding=False)


def _check_tables(block_tables, fork_plan: ForkPlan | None, num_pages: int) -> None:
    """Host-side: every page id the cache will use lies in ``[0, num_pages)``.

    Checked here, once, because the tables never change on the host afterwards: the decode
    loop runs inside ``jit``, where an out-of-range id would be clamped or wrapped onto another
    sequence's page. Every entry counts (the cache writes through each one as it fills), and so
    do the fork plan's tables and copy-on-write copies. Traced tables are left to the kernel.
    """
    if isinstance(block_tables, jax.core.Tracer):
        return
    check_block_tables(block_tables, num_pages)
    if fork_plan is not None:
        check_block_tables(fork_plan.block_tables, num_pages, name="fork_plan.block_tables")
        copies = np.asarray(fork_plan.copies).reshape(-1, 2)
        bad = np.argwhere((copies < 0) | (copies >= num_pages))
        if bad.size:
            i, j = (int(x) for x in bad[0])
            raise ValueError(f"fork_plan.copies[{i}]={tuple(int(x) for x in copies[i])}: its "
                             f"{('src', 'dst')[j]} page {int(copies[i, j])} is not in [0, "
                             f"num_pages={num_pages}); plan copies between pages of this pool.")


class PagedKVCache(nnx.Module):
    """Pages ``[K, P, L, H]`` addressed through ``block_tables [B, max_pages]``.

    ``kv`` (``tx.attention.quant.KVQuant``) quantises the pages; None stores ``dtype``.
    Token-wise schemes (int8, per-token int4) write each token in place. A residual scheme
    (KIVI) keeps each row's partly filled last page in ``dtype`` (``k_tail``/``v_tail``
    ``[K, B, L, H]``) and quantises a page once, when it fills (seals): a sealed page is
    immutable, so a shared prefix page is quantised once for every row that holds it, and a
    copy-on-write copy of a partial page stays in full precision (it lives in the tail).
    Every array is K/V-head major: each stored part of a scheme is ``[K, P, ...]``.

    ``value_dim``: a latent cache (MLA): one pool of keys ``[1, P, L, r + dr]`` and no V pool,
    the values being the keys' first ``value_dim`` columns; pages are copied, shared and
    forked exactly as K/V pages are.
    """

    def __init__(self, block_tables, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype=jnp.float32, fork_plan: ForkPlan | None = None,
                 kv: quant.KVQuant | None = None, value_dim: int | None = None):
        _check_tables(block_tables, fork_plan, num_pages)
        kv = quant.float_kv(dtype) if kv is None else cache_lib.check_kv(kv, head_dim,
                                                                         page_size)
        if value_dim is not None and not 0 < value_dim <= head_dim:
            raise ValueError(f"value_dim={value_dim!r}: the values are the first value_dim "
                             f"columns of keys of width {head_dim}; give 1..{head_dim}.")
        self.kv, self.dtype, self.value_dim = kv, dtype, value_dim
        shape = (num_kv_heads, num_pages, page_size, head_dim)
        self.k_pages = _pool(kv.key, shape, dtype)
        self.v_pages = _pool(kv.value, shape, dtype) if value_dim is None else nnx.data(None)
        self.k_tail = self.v_tail = nnx.data(None)
        rows = np.shape(block_tables)[0]
        if kv.residual:
            tail = (num_kv_heads, rows, page_size, head_dim)
            self.k_tail = _kv_major(jnp.zeros(tail, dtype), "batch")
            if value_dim is None:
                self.v_tail = _kv_major(jnp.zeros(tail, dtype), "batch")
        self.block_tables = nnx.Cache(jnp.asarray(block_tables, jnp.int32),
                                      out_sharding=("batch", None), eager_sharding=False)
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))
        self.page_size = page_size
        self.fork_tables = self.fork_copies = nnx.data(None)
        self.private_from = 0
        if fork_plan is not None:
            self.fork_tables = nnx.Cache(jnp.asarray(fork_plan.block_tables, jnp.int32))
            self.fork_copies = nnx.Cache(jnp.asarray(fork_plan.copies, jnp.int32).reshape(-1, 2))
            self.private_from = int(fork_plan.private_from)

    def fork(self, n: int) -> None:
        """Each row becomes ``n`` rows: the planned block tables, after copy-on-write."""
        if self.fork_tables is None:
            raise ValueError("this PagedKVCache has no fork plan; build it with "
                             "fork_plan=ForkPlan(...) from the PagePool's forks.")
        rows = self.block_tables[...].shape[0] * n
        if self.fork_tables[...].shape[0] != rows:
            raise ValueError(f"fork(n={n}) makes {rows} rows but the fork plan has "
                             f"{self.fork_tables[...].shape[0]}; plan n forks per row.")
        self._copy(self.fork_copies[...][:, 0], self.fork_copies[...][:, 1])
        self.block_tables.set_value(self.fork_tables[...])  # more rows: replace the array
        if self.kv.residual:  # each fork continues the prompt's partial page on its own
            for _, _, tail in self._stores():
                tail.set_value(jnp.repeat(tail[...], n, axis=1))

    def reorder(self, rows: jax.Array) -> None:
        """Row ``i`` continues from row ``rows[i]``: its own pages get ``rows[i]``'s contents.

        Shared prompt pages are identical for every row of a prompt and are left alone; all
        reads happen before any write, so rows may swap pages.
        """
        tables = self.block_tables[...][:, self.private_from:]
        self._copy(tables[rows].reshape(-1), tables.reshape(-1))
        if self.kv.residual:
            for _, _, tail in self._stores():
                tail[...] = tail[...][:, rows]

    def _stores(self) -> list:
        """``(pool, scheme, tail)`` of each stored tensor: K and V, or K alone (latent)."""
        out = [(self.k_pages, self.kv.key, self.k_tail)]
        if self.v_pages is not None:
            out.append((self.v_pages, self.kv.value, self.v_tail))
        return out

    def _copy(self, src, dst) -> None:
        for store, _, _ in self._stores():
            cache_lib.assign(store, {n: x.at[:, dst].set(x[:, src])
                                     for n, x in cache_lib.read(store).items()})

    def _write(self, k_new, v_new):
        if self.kv.residual:
            self._write_sealing(k_new, v_new)
            return
        b, t = k_new.shape[:2]
        pos = self.index[...] + jnp.arange(t, dtype=jnp.int32)  # [T]
        pages = self.block_tables[...][:, pos // self.page_size]  # [B, T]
        offsets = jnp.broadcast_to(pos % self.page_size, (b, t))
        # Rows sharing a prefix page write identical K/V there (same tokens, same positions);
        # token-wise quantisation is deterministic, so identical codes too.
        for (store, scheme, _), new in zip(self._stores(), (k_new, v_new)):
            parts = scheme.quantise(jnp.moveaxis(new, 2, 0))                # [K, B, T, ...]
            cache_lib.assign(store, {n: x.at[:, pages, offsets].set(parts[n])
                                     for n, x in cache_lib.read(store).items()})
        self.index[...] = self.index[...] + t

    def _write_sealing(self, k_new, v_new):
        """Residual schemes: new tokens go after the tail; pages that fill are quantised into
        the pool, and the rest becomes the new tail."""
        b, t = k_new.shape[:2]
        size, start = self.page_size, self.index[...]
        used = start % size                   # tokens in the tail (the same for every row)
        width = -(-(size + t) // size)        # window pages: the tail's and the new tokens'
        filled = (used + t) // size           # window pages that are now full
        cols = start // size + jnp.arange(width, dtype=jnp.int32)  # their logical pages
        tables = self.block_tables[...]
        ids = tables[:, jnp.minimum(cols, tables.shape[1] - 1)]            # [B, width]
        num_pages = jax.tree.leaves(cache_lib.read(self.k_pages))[0].shape[1]
        ids = jnp.where(jnp.arange(width)[None, :] < filled, ids, num_pages)  # past: dropped
        for (store, scheme, tail), new in zip(self._stores(), (k_new, v_new)):
            kh, h = new.shape[2:]
            window = jnp.zeros((kh, b, width * size, h), self.dtype)
            window = jax.lax.dynamic_update_slice_in_dim(window, tail[...], 0, axis=2)
            window = jax.lax.dynamic_update_slice_in_dim(
                window, jnp.moveaxis(new, 2, 0).astype(self.dtype), used, axis=2)
            window = window.reshape(kh, b, width, size, h)

            def seal(pool, window=window, scheme=scheme):
                parts = scheme.quantise(window)                          # [K, B, width, ...]
                return {n: x.at[:, ids].set(parts[n], mode="drop") for n, x in pool.items()}

            # Most decode steps fill no page: skip quantising then (all rows share `used`).
            pool = cache_lib.read(store)
            cache_lib.assign(store, jax.lax.cond(filled > 0, seal, lambda pool: pool, pool))
            tail[...] = jax.lax.dynamic_index_in_dim(window, filled, axis=2, keepdims=False)
        self.index[...] = start + t

    def _gather(self):
        """Every row's pages as contiguous ``k, v [B, S, K, H]`` in the compute dtype (a
        latent cache: ``v`` is the keys' first ``value_dim`` columns)."""
        tables = self.block_tables[...]
        b, w = tables.shape
        out = []
        for store, scheme, tail in self._stores():
            pages = scheme.dequantise({n: x[:, tables]
                                       for n, x in cache_lib.read(store).items()},
                                      self.dtype)                           # [K, B, W, L, H]
            if tail is not None:  # the partial page is read from the tail
                current = jnp.arange(w)[:, None, None] == self.index[...] // self.page_size
                pages = jnp.where(current, tail[...][:, :, None], pages)
            kh, h = pages.shape[0], pages.shape[-1]
            out.append(jnp.moveaxis(pages, 0, 3).reshape(b, w * self.page_size, kh, h))
        if self.v_pages is None:
            out.append(out[0][..., :self.value_dim])
        return tuple(out)

    def _kernel_pages(self):
        """``(k_pages, v_pages, extra kwargs)`` for a paged kernel, or None when the storage
        is one no kernel reads (int4)."""
        k = cache_lib.read(self.k_pages)
        if self.v_pages is None:  # latent: the values are read from the key pages
            if isinstance(self.kv.key, quant.Float):
                return k["x"], None, {}
            if isinstance(self.kv.key, quant.Int8):
                return k["codes"], None, {"k_scales": k["scale"]}
            return None
        v = cache_lib.read(self.v_pages)
        if isinstance(self.kv.key, quant.Float) and isinstance(self.kv.value, quant.Float):
            return k["x"], v["x"], {}
        if isinstance(self.kv.key, quant.Int8) and isinstance(self.kv.value, quant.Int8):
            return k["codes"], v["codes"], {"k_scales": k["scale"], "v_scales": v["scale"]}
        return None

    def _store_and_attend(self, q_btnh, k_new, v_new, *, mask, scale, implementation,
                          positions, score_mod):
        """The leading backends' ``paged_write`` paths, tried in order, store the step's
        tokens in the pools and attend, in one call; None
        (nothing stored) when none has one or every one declines, when the pages are
        quantised, or when a position bias needs the general path."""
        if not isinstance(self.kv.key, quant.Float) or \
                not isinstance(self.kv.value, quant.Float) or self.v_pages is None:
            return None  # (a write-and-attend call has no latent form: the general path)
        t = q_btnh.shape[1]
        end = self.index[...] + t
        if positions.bias(*self._positions(t, end)) is not None:
            return None
        writers = registry.leading(implementation, "paged_write")
        if not writers:
            return None
        lengths = jnp.full((q_btnh.shape[0],), end, jnp.int32)
        call = calls.PagedWrite(q_btnh, k_new, v_new, cache_lib.read(self.k_pages)["x"],
                                cache_lib.read(self.v_pages)["x"], self.block_tables[...],
                                lengths, mask=mask, scale=scale, score_mod=score_mod)
        try:
            out, k, v = registry.serve("paged_write", call, writers)
        except registry.Unserved:
            return None
        cache_lib.assign(self.k_pages, {"x": k})
        cache_lib.assign(self.v_pages, {"x": v})
        self.index[...] = end
        return out

    def _positions(self, t: int, end=None):
        """``q_positions [B, T]`` of the ``t`` newest tokens and ``kv_positions [B, S]`` of
        the gathered pages (-1: an empty slot), once ``end`` tokens are stored (default:
        those stored so far)."""
        tables = self.block_tables[...]
        b, s = tables.shape[0], tables.shape[1] * self.page_size
        slots = jnp.arange(s, dtype=jnp.int32)
        end = self.index[...] if end is None else end
        kv_pos = jnp.broadcast_to(jnp.where(slots < end, slots, -1), (b, s))
        q_pos = jnp.broadcast_to(end - t + jnp.arange(t, dtype=jnp.int32), (b, t))
        return q_pos, kv_pos

    def update(self, k_new, v_new):
        """Writes the new tokens; returns the gathered ``(k, v, q_positions, kv_positions)``."""
        self._write(k_new, v_new)
        return (*self._gather(), *self._positions(k_new.shape[1]))

    def start(self) -> jax.Array:
        return self.index[...]

    def attend(self, q_btnh, k_new, v_new, positions_bt=None, *, mask: masks_lib.Mask,
               scale=None, implementation: Sequence = DEFAULT_IMPLEMENTATION, positions,
               segment_ids=None, kv_lengths=None, cross=False, score_mod=None):
        """Writes the new tokens, then attends: each backend of the order either reads the
        pages in place (its ``paged`` path; int8 pages dequantised in the kernel) or attends
        densely over the gathered, dequantised pages; segment ids, key lengths, a position
        bias or int4 pages take the dense path. Leading backends with a ``paged_write`` path
        (``cpu``) store and attend in one call."""
        if segment_ids is None and kv_lengths is None:
            out = self._store_and_attend(q_btnh, k_new, v_new, mask=mask, scale=scale,
                                         implementation=implementation, positions=positions,
                                         score_mod=score_mod)
            if out is not None:
                return out
        self._write(k_new, v_new)
        t = q_btnh.shape[1]
        q_pos, kv_pos = self._positions(t)
        bias = positions.bias(q_pos, kv_pos)

        def gathered():
            k, v = self._gather()
            return calls.Dense(q_btnh, k, v, mask=mask, segment_ids=segment_ids,
                               kv_lengths=kv_lengths, bias=bias, scale=scale,
                               q_positions=q_pos, kv_positions=kv_pos, score_mod=score_mod)

        in_place = self._kernel_pages()
        if segment_ids is None and kv_lengths is None and bias is None and \
                in_place is not None:
            k_pages, v_pages, extra = in_place
            lengths = jnp.full((q_btnh.shape[0],), self.index[...], jnp.int32)
            return registry.serve("paged", calls.Paged(
                q_btnh, k_pages, v_pages, self.block_tables[...], lengths, mask=mask,
                scale=scale, score_mod=score_mod, value_dim=self.value_dim, **extra),
                implementation,
                fallback=("dense", gathered))
        return registry.serve("dense", gathered(), implementation)
