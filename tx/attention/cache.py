"""KV caches for incremental decoding, held as ``nnx.Cache`` state on the attention module.

Every cache, the paged one (``tx.attention.paged``) included, answers one protocol:

* ``start()``: tokens written so far (where the positions of new tokens begin);
* ``attend(q, k_new, v_new, positions_bt, *, mask, scale, implementation, positions, ...)``:
  stores the new keys and values and returns the attention output ``[B, T, N, H]``;
* ``update(k_new, v_new) -> (k, v, q_positions, kv_positions)``: the keys and values to attend
  over and the positions at which the mask (and a position bias) is evaluated there. A slot
  with position ``-1`` is empty and nobody sees it.

``NO_CACHE`` answers the same calls for training and encoders. The model enables decoding by
attribute assignment (``attn.cache = KVCache(...)``), not by a ``decode`` flag.

Beam search and parallel sampling also use ``fork(n)`` (each row becomes ``n`` consecutive
rows after the prompt is prefilled once) and ``reorder(rows)`` (row ``i`` continues from row
``rows[i]``); the paged cache answers both too, by sharing and copying pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import masks as masks_lib
from tx.attention import registry

# Logical names of a cache's K/V ``[B, S, K, H]``: under a mesh (``tx.parallel``) the rows split
# like the batch and the K/V heads like the attention heads.
KV_NAMES = ("batch", None, "kv_heads", "head_dim")


def kv_buffer(shape, dtype) -> nnx.Cache:
    return nnx.Cache(jnp.zeros(shape, dtype), out_sharding=KV_NAMES, eager_sharding=False)




class _NoCache:
    """Training, scoring and encoders: attend over this call's keys only."""

    def start(self) -> int:
        return 0

    def attend(self, q_btnh, k_bskh, v_bskh, positions_bt, *, mask, scale, implementation,
               positions, segment_ids=None, kv_lengths=None, cross=False) -> jax.Array:
        bias = None if cross else positions.bias(positions_bt, positions_bt)
        return registry.attend(q_btnh, k_bskh, v_bskh, mask=mask, segment_ids=segment_ids,
                               kv_lengths=kv_lengths, bias=bias, scale=scale,
                               implementation=implementation)


NO_CACHE = _NoCache()


class _RowCache(nnx.Module):
    """The cached ``attend``, ``start`` and ``fork`` / ``reorder`` for caches that hold every
    row's K/V in ``k``/``v [B, ...]``."""

    def start(self) -> jax.Array:
        return self.index[...]

    def attend(self, q_btnh, k_new, v_new, positions_bt=None, *, mask, scale, implementation,
               positions, segment_ids=None, kv_lengths=None, cross=False) -> jax.Array:
        k, v, q_pos, kv_pos = self.update(k_new, v_new)
        # The mask and the position bias are taken at the positions the cache reports.
        return registry.attend(q_btnh, k, v, mask=mask, segment_ids=segment_ids,
                               kv_lengths=kv_lengths, bias=positions.bias(q_pos, kv_pos),
                               scale=scale, implementation=implementation, q_positions=q_pos,
                               kv_positions=kv_pos)

    def fork(self, n: int) -> None:
        # `set_value` rather than `[...] =`: the row count changes.
        self.k.set_value(jnp.repeat(self.k[...], n, axis=0))
        self.v.set_value(jnp.repeat(self.v[...], n, axis=0))

    def reorder(self, rows: jax.Array) -> None:
        self.k[...] = self.k[...][rows]
        self.v[...] = self.v[...][rows]


class KVCache(_RowCache):
    """Contiguous, preallocated cache of ``max_len`` positions ``[B, S, K, H]``."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype=jnp.float32):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k, self.v = kv_buffer(shape, dtype), kv_buffer(shape, dtype)
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))  # tokens written so far
        self.max_len = max_len

    def update(self, k_new, v_new):
        b, t = k_new.shape[:2]
        start = self.index[...]
        self.k[...] = jax.lax.dynamic_update_slice(self.k[...], k_new.astype(self.k[...].dtype),
                                                    (0, start, 0, 0))
        self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v_new.astype(self.v[...].dtype),
                                                    (0, start, 0, 0))
        self.index[...] = start + t
        slots = jnp.arange(self.max_len, dtype=jnp.int32)
        kv_pos = jnp.where(slots < start + t, slots, -1)
        q_pos = start + jnp.arange(t, dtype=jnp.int32)
        return (self.k[...], self.v[...], jnp.broadcast_to(q_pos, (b, t)),
                jnp.broadcast_to(kv_pos, (b, self.max_len)))


class RollingKVCache(_RowCache):
    """Ring buffer of the last ``window`` positions, for causal sliding-window masks.

    Memory is O(window) however long the sequence grows. A chunk of new tokens attends over
    the ring (older keys) concatenated with itself, so chunks longer than the window are fine.
    """

    def __init__(self, batch: int, window: int, num_kv_heads: int, head_dim: int, *,
                 dtype=jnp.float32):
        shape = (batch, window, num_kv_heads, head_dim)
        self.k, self.v = kv_buffer(shape, dtype), kv_buffer(shape, dtype)
        self.pos = nnx.Cache(jnp.full((window,), -1, jnp.int32))  # position held by each slot
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))
        self.window = window

    def update(self, k_new, v_new):
        b, t = k_new.shape[:2]
        start = self.index[...]
        new_pos = start + jnp.arange(t, dtype=jnp.int32)
        k_new, v_new = k_new.astype(self.k[...].dtype), v_new.astype(self.v[...].dtype)
        k = jnp.concatenate([self.k[...], k_new], axis=1)
        v = jnp.concatenate([self.v[...], v_new], axis=1)
        kv_pos = jnp.concatenate([self.pos[...], new_pos])
        keep = min(t, self.window)  # only the newest `window` tokens survive in the ring
        slots = new_pos[t - keep:] % self.window
        self.k[...] = self.k[...].at[:, slots].set(k_new[:, t - keep:])
        self.v[...] = self.v[...].at[:, slots].set(v_new[:, t - keep:])
        self.pos[...] = self.pos[...].at[slots].set(new_pos[t - keep:])
        self.index[...] = start + t
        return (k, v, jnp.broadcast_to(new_pos, (b, t)),
                jnp.broadcast_to(kv_pos, (b, self.window + t)))


def rolling_window(mask: masks_lib.Mask) -> int | None:
    """Keys a query can see at most when the mask is a causal band (else None)."""
    band = mask.band()
    if band is None or band[1] > 0 or band[0] == float("-inf"):
        return None
    return int(-band[0]) + 1


def make_cache(mask: masks_lib.Mask, batch: int, max_len: int, num_kv_heads: int,
               head_dim: int, *, dtype=jnp.float32) -> nnx.Module:
    """A rolling cache when the mask is a causal window shorter than ``max_len``."""
    window = rolling_window(mask)
    if window is not None and window < max_len:
        return RollingKVCache(batch, window, num_kv_heads, head_dim, dtype=dtype)
    return KVCache(batch, max_len, num_kv_heads, head_dim, dtype=dtype)
