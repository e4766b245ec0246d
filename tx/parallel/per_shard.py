"""Kernels inside a sharded program: each device runs the Pallas kernel on its own rows and
heads under ``shard_map``.

XLA's partitioner (GSPMD) splits the ``xla`` attention like any einsum, but a Pallas kernel is
an opaque custom call to it: it would gather every input onto every device. So when a mesh is
active the kernel is wrapped in ``shard_map`` with batch rows split over ``(data, fsdp)`` and
heads over ``tensor``. Attention never mixes rows or heads, so the per-shard results are the
global result. GQA stays native per shard: query heads ``[i*N/t, (i+1)*N/t)`` use K/V heads
``[i*K/t, (i+1)*K/t)``; a single K/V head (MQA) is kept whole on every shard. Any other split
raises ``NotImplementedError`` so the registry falls back to the next implementation.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import PartitionSpec

from tx.parallel import shard as shard_lib

try:  # JAX >= 0.7 (our CPU pin and the GPU machine's 0.11)
    _shard_map, _NO_CHECK = jax.shard_map, {"check_vma": False}
except AttributeError:  # older JAX
    from jax.experimental.shard_map import shard_map as _shard_map
    _NO_CHECK = {"check_rep": False}


def shard_map(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    """``shard_map`` without replication checks (Pallas calls carry no replication rule)."""
    return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_NO_CHECK)


def _head_specs(parallel, q_shape, kv_shape, q_names, kv_names):
    """(q spec, k/v spec), or NotImplementedError when the head split breaks the GQA groups."""
    q_spec = parallel.spec(q_names, q_shape)
    kv_spec = parallel.spec(kv_names, kv_shape)
    q_heads, kv_heads = q_spec[q_names.index("heads")], kv_spec[kv_names.index("kv_heads")]
    k = kv_shape[kv_names.index("kv_heads")]
    if q_heads != kv_heads and not (q_heads is None or k == 1):
        raise NotImplementedError(
            f"the tensor split of {q_shape[q_names.index('heads')]} query heads does not "
            f"match {k} K/V heads; make mesh.tensor divide num_kv_heads")
    return q_spec, kv_spec


def attention(fn: Callable) -> Callable:
    """Wraps an attention implementation (the signature of ``kernels.reference.attention``)
    so that, under an active mesh, it runs per shard."""
    q_names, kv_names = ("batch", None, "heads", None), ("batch", None, "kv_heads", None)

    @functools.wraps(fn)
    def call(q, k, v, *, segment_ids=None, kv_lengths=None, **static):
        parallel = shard_lib.active()
        if parallel is None or any(static.get(n) is not None
                                   for n in ("bias", "q_positions", "kv_positions")):
            # One device; or a case the kernel refuses anyway (it raises NotImplementedError).
            return fn(q, k, v, segment_ids=segment_ids, kv_lengths=kv_lengths, **static)
        if static.get("score_mod") is not None:
            # Its per-head parameters would need splitting like the heads: left to xla.
            raise NotImplementedError("score modifiers do not run per shard yet")
        q_spec, kv_spec = _head_specs(parallel, q.shape, k.shape, q_names, kv_names)
        if q_spec[0] != kv_spec[0]:  # a batch of 1 broadcast against many, say
            raise NotImplementedError("queries and keys have different batch splits")
        rows = PartitionSpec(q_spec[0])
        seg_specs = None if segment_ids is None else \
            (PartitionSpec(q_spec[0], None), PartitionSpec(q_spec[0], None))

        def local(q, k, v, segment_ids, kv_lengths):
            return fn(q, k, v, segment_ids=segment_ids, kv_lengths=kv_lengths, **static)

        return shard_map(local, parallel.mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, seg_specs,
                                   None if kv_lengths is None else rows),
                         out_specs=q_spec)(q, k, v, segment_ids, kv_lengths)

    return call


def cached(fn: Callable) -> Callable:
    """Wraps a contiguous cache's kernel (``kernels.cpu_attention.cached_attention``) as
    ``attention`` does: each row's length travels with its row."""

    def as_attention(q, k, v, *, segment_ids=None, kv_lengths=None, **static):
        del segment_ids  # a cache's call never has them
        return fn(q, k, v, kv_lengths, **static)

    wrapped = attention(as_attention)

    @functools.wraps(fn)
    def call(q, k, v, lengths, **static):
        return wrapped(q, k, v, kv_lengths=lengths, **static)
    return call


def paged(fn: Callable) -> Callable:
    """Wraps ``kernels.paged_attention.paged_attention`` the same way: sequences split over
    ``(data, fsdp)`` with their block tables and lengths, heads over ``tensor``; the page pool
    is split by K/V head only (a page may be shared by sequences on different devices)."""

    @functools.wraps(fn)
    def call(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None,
             **static):
        parallel = shard_lib.active()
        if parallel is None:
            if k_scales is not None:
                static = dict(static, k_scales=k_scales, v_scales=v_scales)
            return fn(q, k_pages, v_pages, block_tables, lengths, **static)
        if static.get("score_mod") is not None:
            raise NotImplementedError("score modifiers do not run per shard yet")
        q_names = ("batch", "heads", None) if q.ndim == 3 else ("batch", None, "heads", None)
        q_spec, page_spec = _head_specs(parallel, q.shape, k_pages.shape, q_names,
                                        ("kv_heads", None, None, None))
        page_spec = PartitionSpec(*page_spec)
        rows = q_spec[0]

        specs = (q_spec, page_spec, page_spec, PartitionSpec(rows, None), PartitionSpec(rows))
        if k_scales is None:
            def local(q, k_pages, v_pages, block_tables, lengths):
                return fn(q, k_pages, v_pages, block_tables, lengths, **static)

            return shard_map(local, parallel.mesh, in_specs=specs, out_specs=q_spec)(
                q, k_pages, v_pages, block_tables, lengths)

        # int8 pages: their scales [K, P, L] split by K/V head like the pages.
        scale_spec = PartitionSpec(*tuple(page_spec)[:3])

        def local_int8(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales):
            return fn(q, k_pages, v_pages, block_tables, lengths, k_scales=k_scales,
                      v_scales=v_scales, **static)

        return shard_map(local_int8, parallel.mesh, in_specs=specs + (scale_spec, scale_spec),
                         out_specs=q_spec)(q, k_pages, v_pages, block_tables, lengths,
                                           k_scales, v_scales)

    return call
