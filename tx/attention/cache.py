"""KV caches for incremental decoding, held as ``nnx.Cache`` state on the attention module.

Every cache, the paged one (``tx.attention.paged``) included, answers one protocol:

* ``start()``: tokens written so far (where the positions of new tokens begin);
* ``attend(q, k_new, v_new, positions_bt, *, mask, scale, implementation, positions, ...)``:
  stores the new keys and values and returns the attention output ``[B, T, N, H]``;
* ``update(k_new, v_new) -> (k, v, q_positions, kv_positions)``: the keys and values to attend
  over and the positions at which the mask (and a position bias) is evaluated there. A slot
  with position ``-1`` is empty and nobody sees it.

A latent cache (``value_dim``; MLA's ``[c_kv, k_rope]``, ``tx.attention.mla``) stores keys only,
one K/V head wide: ``v_new`` is None and the values are the keys' first ``value_dim`` columns
(``calls.Cached(..., value_dim=...)``), so each token is stored once for every head.

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

from tx.kernels import masks as masks_lib
from tx.attention import calls, quant, registry
from tx.parallel import shard as shard_lib

# Logical names of a cache's K/V ``[B, S, K, H]``: under a mesh (``tx.parallel``) the rows split
# like the batch and the K/V heads like the attention heads.
KV_NAMES = ("batch", None, "kv_heads", "head_dim")


def kv_buffer(shape, dtype) -> nnx.Cache:
    return nnx.Cache(jnp.zeros(shape, dtype), out_sharding=KV_NAMES, eager_sharding=False)


def buffers(scheme, shape: tuple, dtype, lead_names: tuple) -> dict:
    """Empty storage of a ``shape`` tensor under ``scheme`` (``tx.attention.quant``): one
    ``nnx.Cache`` per part, named ``lead_names`` on the leading axes and the scheme's names on
    the trailing ones (K/V heads shard like the attention heads)."""
    out = {}
    for name, part in quant.zeros(scheme, shape, dtype).items():
        trailing = scheme.axes[name]
        names = tuple(lead_names) + (None,) * (part.ndim - len(lead_names) - len(trailing))
        out[name] = nnx.Cache(part, out_sharding=names + tuple(trailing), eager_sharding=False)
    return nnx.data(out)


def read(store: dict) -> dict:
    """The arrays of a storage dict."""
    return {name: c[...] for name, c in store.items()}


def assign(store: dict, parts: dict, *, reshape: bool = False) -> None:
    """Writes ``parts`` back (``reshape``: their shapes may differ, e.g. more rows)."""
    for name, c in store.items():
        if reshape:
            c.set_value(parts[name])
        else:
            c[...] = parts[name]


def check_kv(kv: quant.KVQuant, head_dim: int, page_size: int | None = None) -> quant.KVQuant:
    if not isinstance(kv, quant.KVQuant):
        raise ValueError(f"kv={kv!r}: give a tx.attention.quant.KVQuant (int8_kv(), "
                         "kivi_kv(), ...) or None for the compute dtype.")
    kv.check(head_dim, page_size)
    return kv


class _NoCache:
    """Training, scoring and encoders: attend over this call's keys only."""

    def start(self) -> int:
        return 0

    def attend(self, q_btnh, k_bskh, v_bskh, positions_bt, *, mask, scale, implementation,
               positions, segment_ids=None, kv_lengths=None, cross=False,
               score_mod=None) -> jax.Array:
        bias = None if cross else positions.bias(positions_bt, positions_bt)
        context = _context_parallel()
        if context is not None:  # the sequence is split over the mesh's context axis
            return context.attend(q_btnh, k_bskh, v_bskh, parallel=shard_lib.active(),
                                  mask=mask, segment_ids=segment_ids, kv_lengths=kv_lengths,
                                  bias=bias, scale=scale, score_mod=score_mod,
                                  implementation=implementation)
        # The score modifier sees the default (aligned) positions: relative distances within
        # a packed document equal those of its restarted positions.
        return registry.serve("dense", calls.Dense(
            q_btnh, k_bskh, v_bskh, mask=mask, segment_ids=segment_ids, kv_lengths=kv_lengths,
            bias=bias, scale=scale, score_mod=score_mod), implementation)


NO_CACHE = _NoCache()


def _context_parallel():
    """``tx.parallel.context`` when the active mesh splits the sequence, else None."""
    parallel = shard_lib.active()
    if parallel is None or parallel.context == 1:
        return None
    from tx.parallel import context  # noqa: PLC0415  (it imports tx.attention)
    return context


class _RowCache(nnx.Module):
    """The cached ``attend``, ``start`` and ``fork`` / ``reorder`` for caches that hold every
    row's K/V in ``k``/``v``: storage dicts (``tx.attention.quant``) of parts ``[B, ...]``."""

    def _init_storage(self, shape: tuple, dtype, kv: quant.KVQuant | None,
                      value_dim: int | None = None) -> None:
        """``value_dim``: a latent cache (MLA) with no V store, its values the first
        ``value_dim`` columns of the keys (stored once per token)."""
        kv = quant.float_kv(dtype) if kv is None else check_kv(kv, shape[-1])
        if value_dim is not None and not 0 < value_dim <= shape[-1]:
            raise ValueError(f"value_dim={value_dim!r}: the values are the first value_dim "
                             f"columns of keys of width {shape[-1]}; give 1..{shape[-1]}.")
        if kv.residual:
            raise ValueError(f"kv_dtype={kv!r} quantises whole pages (KIVI), which needs the "
                             "paged cache: use cache=Paged(page_size), or int8 / "
                             "int4_per_token for a contiguous or rolling cache.")
        self.kv, self.dtype = kv, dtype
        self.value_dim = value_dim
        self.k = buffers(kv.key, shape, dtype, ("batch",))
        self.v = nnx.data(None) if value_dim is not None else \
            buffers(kv.value, shape, dtype, ("batch",))

    def _stores(self, k_new=None, v_new=None) -> list:
        """``(store, scheme, new)`` of each stored tensor: K and V, or K alone (latent)."""
        out = [(self.k, self.kv.key, k_new)]
        if self.v is not None:
            out.append((self.v, self.kv.value, v_new))
        return out

    def _values(self, k: jax.Array, v: jax.Array | None) -> jax.Array:
        """The values: ``v``, or the keys' first ``value_dim`` columns (a latent cache)."""
        return k[..., :self.value_dim] if self.v is None else v

    def _stored(self) -> tuple[jax.Array, jax.Array]:
        """The whole cache as the compute dtype (dequantised when quantised)."""
        k = self.kv.key.dequantise(read(self.k), self.dtype)
        if self.v is None:
            return k, self._values(k, None)
        return k, self.kv.value.dequantise(read(self.v), self.dtype)

    def start(self) -> jax.Array:
        return self.index[...]

    def attend(self, q_btnh, k_new, v_new, positions_bt=None, *, mask, scale, implementation,
               positions, segment_ids=None, kv_lengths=None, cross=False,
               score_mod=None) -> jax.Array:
        k, v, q_pos, kv_pos = self.update(k_new, v_new)
        # The mask, the position bias and the score modifier are taken at the positions the
        # cache reports.
        bias = positions.bias(q_pos, kv_pos)
        dense = calls.Dense(q_btnh, k, v, mask=mask, segment_ids=segment_ids,
                            kv_lengths=kv_lengths, bias=bias, scale=scale, q_positions=q_pos,
                            kv_positions=kv_pos, score_mod=score_mod)
        view = None
        if segment_ids is None and kv_lengths is None and bias is None:
            view = self.prefix_view(k, v, kv_pos, score_mod)
        if view is not None:
            # A backend's cached path knows these positions without them; one without it
            # (or declining) attends densely at the positions. A latent cache passes its
            # keys only: the backend reads the values from their first columns.
            k_view, v_view, lengths = view
            if self.v is not None:
                cached = calls.Cached(q_btnh, k_view, v_view, lengths, mask=mask,
                                      scale=scale, score_mod=score_mod)
            else:
                cached = calls.Cached(q_btnh, k_view, None, lengths, mask=mask, scale=scale,
                                      score_mod=score_mod, value_dim=self.value_dim)
            return registry.serve("cached", cached,
                                  implementation, fallback=("dense", lambda: dense))
        return registry.serve("dense", dense, implementation)

    def prefix_view(self, k, v, kv_pos, score_mod):
        """``(k, v, lengths [B])`` laid out as a cached path assumes (the written slots a
        prefix ending at the new tokens), or None when this cache cannot give one."""
        return None

    def _map(self, fn, *, reshape: bool = False) -> None:
        for store, _, _ in self._stores():
            assign(store, {n: fn(x) for n, x in read(store).items()}, reshape=reshape)

    def fork(self, n: int) -> None:
        # The row count changes: whole arrays are replaced.
        self._map(lambda x: jnp.repeat(x, n, axis=0), reshape=True)

    def reorder(self, rows: jax.Array) -> None:
        self._map(lambda x: x[rows])


class KVCache(_RowCache):
    """Contiguous, preallocated cache of ``max_len`` positions ``[B, S, K, H]``, stored in
    ``dtype`` or quantised by ``kv`` (token-wise schemes, ``tx.attention.quant``)."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype=jnp.float32, kv: quant.KVQuant | None = None,
                 value_dim: int | None = None):
        self._init_storage((batch, max_len, num_kv_heads, head_dim), dtype, kv, value_dim)
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))  # tokens written so far
        self.max_len = max_len

    def prefix_view(self, k, v, kv_pos, score_mod):
        return k, v, jnp.full((k.shape[0],), self.index[...], jnp.int32)

    def update(self, k_new, v_new):
        b, t = k_new.shape[:2]
        start = self.index[...]
        for store, scheme, new in self._stores(k_new, v_new):
            parts = scheme.quantise(new)
            assign(store, {n: jax.lax.dynamic_update_slice_in_dim(x, parts[n], start, axis=1)
                           for n, x in read(store).items()})
        self.index[...] = start + t
        slots = jnp.arange(self.max_len, dtype=jnp.int32)
        kv_pos = jnp.where(slots < start + t, slots, -1)
        q_pos = start + jnp.arange(t, dtype=jnp.int32)
        return (*self._stored(), jnp.broadcast_to(q_pos, (b, t)),
                jnp.broadcast_to(kv_pos, (b, self.max_len)))


class RollingKVCache(_RowCache):
    """Ring buffer of the last ``window`` positions, for causal sliding-window masks.

    Memory is O(window) however long the sequence grows. A chunk of new tokens attends over
    the ring (older keys) concatenated with itself, so chunks longer than the window are fine.
    """

    def __init__(self, batch: int, window: int, num_kv_heads: int, head_dim: int, *,
                 dtype=jnp.float32, kv: quant.KVQuant | None = None,
                 value_dim: int | None = None):
        self._init_storage((batch, window, num_kv_heads, head_dim), dtype, kv, value_dim)
        self.pos = nnx.Cache(jnp.full((window,), -1, jnp.int32))  # position held by each slot
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))
        self.window = window

    def update(self, k_new, v_new):
        b, t = k_new.shape[:2]
        start = self.index[...]
        new_pos = start + jnp.arange(t, dtype=jnp.int32)
        keep = min(t, self.window)  # only the newest `window` tokens survive in the ring
        slots = new_pos[t - keep:] % self.window
        out = []
        for store, scheme, new in self._stores(k_new, v_new):
            ring, parts = read(store), scheme.quantise(new)
            # The new tokens are attended as stored (quantised), like the older ones.
            both = {n: jnp.concatenate([ring[n], parts[n]], axis=1) for n in ring}
            out.append(scheme.dequantise(both, self.dtype))
            assign(store, {n: ring[n].at[:, slots].set(parts[n][:, t - keep:]) for n in ring})
        kv_pos = jnp.concatenate([self.pos[...], new_pos])
        self.pos[...] = self.pos[...].at[slots].set(new_pos[t - keep:])
        self.index[...] = start + t
        k, v = out if len(out) == 2 else (out[0], self._values(out[0], None))
        return (k, v, jnp.broadcast_to(new_pos, (b, t)),
                jnp.broadcast_to(kv_pos, (b, self.window + t)))

    def prefix_view(self, k, v, kv_pos, score_mod):
        """The ring in time order, then the new tokens, then the empty slots: positions
        shifted to start at 0, exact for the causal window this cache holds (a band reads
        distances only) when the score modifier reads distances only too."""
        if not _relative(score_mod):
            return None
        key = jnp.where(kv_pos[0] < 0, jnp.iinfo(jnp.int32).max, kv_pos[0])
        order = jnp.argsort(key)  # valid slots ascending (a contiguous range), empties last
        lengths = jnp.full((k.shape[0],), jnp.sum(kv_pos[0] >= 0), jnp.int32)
        v = None if self.v is None else jnp.take(v, order, axis=1)
        return jnp.take(k, order, axis=1), v, lengths


def _relative(score_mod) -> bool:
    """Whether a rolling cache's keys shifted to start at position 0 give the same logits."""
    return score_mod is None or bool(getattr(score_mod, "relative", False))


def rolling_window(mask: masks_lib.Mask) -> int | None:
    """Keys a query can see at most when the mask is a causal band (else None)."""
    band = mask.band()
    if band is None or band[1] > 0 or band[0] == float("-inf"):
        return None
    return int(-band[0]) + 1


def make_cache(mask: masks_lib.Mask, batch: int, max_len: int, num_kv_heads: int,
               head_dim: int, *, dtype=jnp.float32, kv: quant.KVQuant | None = None,
               value_dim: int | None = None) -> nnx.Module:
    """A rolling cache when the mask is a causal window shorter than ``max_len``; ``kv``
    quantises its storage (None: ``dtype``); ``value_dim``: a latent cache (no V store, the
    values the keys' first ``value_dim`` columns)."""
    window = rolling_window(mask)
    if window is not None and window < max_len:
        return RollingKVCache(batch, window, num_kv_heads, head_dim, dtype=dtype, kv=kv,
                              value_dim=value_dim)
    return KVCache(batch, max_len, num_kv_heads, head_dim, dtype=dtype, kv=kv,
                   value_dim=value_dim)
