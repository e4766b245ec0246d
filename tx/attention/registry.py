"""Attention implementations by name, tried in order.

An implementation is a function with the signature of ``kernels.reference.attention``,
named here by ``register`` (the single source of implementation names: configs and flags
accept exactly these, ``names()``) or passed directly as a callable. When it cannot serve a
case (a mask it does not support, no GPU, custom positions...) it raises
``NotImplementedError`` at trace time and ``attend`` tries the next name. The library never
branches on implementation strings anywhere else. Under an active device mesh
(``tx.parallel.use``) XLA partitions the ``xla`` einsums itself; the Pallas kernel runs per
shard (``tx.parallel.per_shard``).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kernels import masks as masks_lib
from kernels import cpu_attention, reference
from kernels.flash_attention import registry_attention as _pallas
from kernels.linear_attention import linear_attention as _linear_pallas_kernel
from kernels.linear_attention import linear_attention_chunked as _linear_chunked
from kernels.paged_attention import paged_attention as _paged_pallas
from tx.config import DEFAULT_IMPLEMENTATION
from tx.parallel import per_shard
from tx.parallel import shard as shard_lib

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) an implementation; research code may register its own."""
    _REGISTRY[name] = fn


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# Paged-cache paths by implementation name (the signature of ``kernels.paged_attention``):
# kernels that read the pages in place, and the ``xla`` reference, which gathers whole
# K-major pages. A paged cache tries them in its ``implementation`` order and attends over
# its gathered pages (``attend``) from the first name that has none.
_PAGED: dict[str, AttentionFn] = {}
_MAX_PAGED_TOKENS = 16  # tokens per kernel call; longer prefills go in chunks of this many
_MAX_PAGED_CHUNKS = 64  # past this many chunks a prefill attends over the gathered pages


def register_paged(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) the paged-cache kernel of implementation ``name``."""
    _PAGED[name] = fn


def paged_kernel(name) -> AttentionFn | None:
    return None if callable(name) else _PAGED.get(name)


# Paged-cache writers by implementation name: ``fn(q, k_new, v_new, k_pages, v_pages,
# block_tables, lengths, *, mask, scale, score_mod) -> (out, k_pages, v_pages)`` stores a
# step's tokens in fp32 pools and attends in one call (``kernels.cpu_attention.
# paged_write_attention``). A paged cache tries its leading implementations' in order.
_PAGED_WRITERS: dict[str, AttentionFn] = {}


def register_paged_writer(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) the paged-cache writer of implementation ``name``."""
    _PAGED_WRITERS[name] = fn


def paged_writer(name) -> AttentionFn | None:
    return None if callable(name) else _PAGED_WRITERS.get(name)


def _whole_pool(fn: AttentionFn) -> AttentionFn:
    """A writer stores into the whole page pool: per shard, each device's copy of a pool
    shared across batch shards would take only its own rows' tokens, so under a mesh it
    declines (the paged kernels run per shard instead)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if shard_lib.active() is not None:
            raise NotImplementedError("a paged writer does not run per shard")
        return fn(*args, **kwargs)
    return call


# Contiguous-cache paths by implementation name: ``fn(q, k, v, lengths, *, mask, scale,
# score_mod)`` over a cache's ``k, v [B, S, K, H]`` whose first ``lengths [B]`` slots are
# written, the new queries at its end (``kernels.cpu_attention.cached_attention``). A name
# without one attends through ``attend`` with the cache's positions.
_CACHED: dict[str, AttentionFn] = {}


def register_cached(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) the contiguous-cache kernel of implementation ``name``."""
    _CACHED[name] = fn


def cached_kernel(name) -> AttentionFn | None:
    return None if callable(name) else _CACHED.get(name)


def first_kernel(implementation: Sequence, kernel_of: Callable, call: Callable):
    """Tries the kernels ``kernel_of(name)`` of ``implementation``'s leading names in order
    (``call(kernel)`` runs one) up to the first name without one. Returns ``(output, ())``
    from the first that serves, else ``(None, names)``: the names the general path tries,
    from the first without a kernel, or all of them when every kernel declined (the
    registry then says why each one did)."""
    implementation = _as_tuple(implementation)
    for first, name in enumerate(implementation):
        kernel = kernel_of(name)
        if kernel is None:
            return None, implementation[first:]
        try:
            return call(kernel), ()
        except NotImplementedError:
            pass
    return None, implementation


def _as_tuple(implementation) -> tuple:
    if isinstance(implementation, str) or callable(implementation):
        return (implementation,)
    return tuple(implementation)


def check(implementation) -> tuple:
    """``implementation`` as a tuple of registered names and callables; a ValueError names
    an unknown one and the known names."""
    implementation = _as_tuple(implementation)
    if not implementation:
        raise ValueError("implementation=(): name at least one, e.g. ('xla',).")
    for impl in implementation:
        if not callable(impl) and impl not in _REGISTRY:
            raise ValueError(f"implementation={impl!r} is not registered; known: {names()}. "
                             "Register your own with tx.attention.register(name, fn), or pass "
                             "the function itself.")
    return implementation


def attend(q, k, v, *, implementation: Sequence = DEFAULT_IMPLEMENTATION, **kwargs) -> jax.Array:
    """Runs the first implementation in ``implementation`` (names or callables) that supports
    the case."""
    implementation = check(implementation)
    if kwargs.get("score_mod", 0) is None:
        del kwargs["score_mod"]  # implementations that predate score modifiers still serve
    reasons = []
    for impl in implementation:
        fn = impl if callable(impl) else _REGISTRY[impl]
        try:
            return fn(q, k, v, **kwargs)
        except NotImplementedError as e:
            reasons.append(f"{getattr(impl, '__name__', impl)}: {e}")
    raise NotImplementedError(
        f"no implementation in {tuple(implementation)} supports this case ("
        + "; ".join(reasons) + "). Append 'xla', which supports every case.")


def _cudnn(q, k, v, *, mask=None, segment_ids=None, kv_lengths=None, scale=None, bias=None,
           q_positions=None, kv_positions=None, score_mod=None):
    """``jax.nn.dot_product_attention`` with cuDNN, for the cases it expresses exactly."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError("cuDNN needs a GPU")
    if score_mod is not None:
        raise NotImplementedError("score modifiers are not expressed through jax.nn")
    if q.dtype.itemsize != 2:
        raise NotImplementedError(f"cuDNN flash attention takes fp16/bf16, not {q.dtype}")
    if segment_ids is not None or q_positions is not None or kv_positions is not None:
        raise NotImplementedError("segment ids and custom positions are not expressed")
    mask = masks_lib.Full() if mask is None else mask
    t, s = q.shape[1], k.shape[1]
    band = mask.band()
    if band is None or (band[1] == 0 and t != s) or band[1] not in (0, float("inf")):
        # jax.nn's causal flag is top-left aligned; only square causal cases agree with ours.
        raise NotImplementedError(f"mask {mask} has no cuDNN equivalent")
    causal = band[1] == 0
    window = None if band[0] == float("-inf") else (int(-band[0]), 0)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=scale, is_causal=causal, local_window_size=window,
        key_value_seq_lengths=kv_lengths, implementation="cudnn")


def _pallas_paged(q, k_pages, v_pages, block_tables, lengths, *, mask, scale=None,
                  k_scales=None, v_scales=None, score_mod=None):
    """Our Pallas paged-decode kernel, for the decode steps it is built for (int8 pages with
    their per-token scales and score modifiers included). A prefill of more tokens under a
    mask that never shows a query later keys (causal, sliding window) runs as chunks of
    ``_MAX_PAGED_TOKENS``: chunk ``c`` is exact with the length cut at its last token, since
    the keys after it are hidden from it anyway."""
    t, page = (1 if q.ndim == 3 else q.shape[1]), k_pages.shape[2]
    band = (mask or masks_lib.Full()).band()
    if t > _MAX_PAGED_TOKENS and (band is None or band[1] > 0 or
                                  t > _MAX_PAGED_TOKENS * _MAX_PAGED_CHUNKS):
        raise NotImplementedError(f"{t} new tokens under {mask}: the paged kernel serves "
                                  f"decode steps of up to {_MAX_PAGED_TOKENS}, and causal "
                                  f"prefills of up to {_MAX_PAGED_TOKENS * _MAX_PAGED_CHUNKS}")
    if page & (page - 1):
        raise NotImplementedError(f"page size {page} is not a power of two")
    extra = {} if k_scales is None else {"k_scales": k_scales, "v_scales": v_scales}
    if score_mod is not None:
        extra["score_mod"] = score_mod
    kernel = per_shard.paged(_paged_pallas)
    if t <= _MAX_PAGED_TOKENS:
        return kernel(q, k_pages, v_pages, block_tables, lengths, mask=mask, scale=scale,
                      **extra)
    outs = []
    for c0 in range(0, t, _MAX_PAGED_TOKENS):
        c1 = min(t, c0 + _MAX_PAGED_TOKENS)
        outs.append(kernel(q[:, c0:c1], k_pages, v_pages, block_tables, lengths - (t - c1),
                           mask=mask, scale=scale, **extra))
    return jnp.concatenate(outs, axis=1)


register("xla", reference.attention)
register("cudnn", _cudnn)
register("pallas", per_shard.attention(_pallas))  # per shard under a mesh; GSPMD splits xla
# Fused C++ kernel on the CPU backend (fp32 compute, banded masks); declines elsewhere.
register("cpu", per_shard.attention(cpu_attention.attention))
register_paged("pallas", _pallas_paged)
# Gathers whole K-major pages and attends without transposing them: on a CPU a decode step
# over the paged cache then costs what one over a contiguous cache does.
register_paged("xla", reference.paged_attention)
# Reads the pages in place through the block tables (fp32 pages; int8 pages go to xla's).
register_paged("cpu", per_shard.paged(cpu_attention.paged_attention))
register_cached("cpu", per_shard.cached(cpu_attention.cached_attention))
register_paged_writer("cpu", _whole_pool(cpu_attention.paged_write_attention))


# --- linear (feature-map) attention ------------------------------------------------------------
# By implementation name, ``fn(q_f, k_f, v, *, causal, segment_ids, kv_lengths, chunk)`` over
# featurised queries/keys (``tx.attention.favor``); a layer uses the first of its names that
# has one and does not decline (NotImplementedError).
_LINEAR: dict[str, AttentionFn] = {}


def register_linear(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) the linear-attention path of implementation ``name``."""
    _LINEAR[name] = fn


def linear_attend(q_f, k_f, v, *, causal: bool, segment_ids=None, kv_segment_ids=None,
                  kv_lengths=None, chunk: int, implementation: Sequence = ("xla",)):
    """Linear attention ``[B, T, N, H]`` of features ``q_f [B, T, N, F]``, ``k_f [B, S, K, F]``
    through the first implementation with a linear path."""
    if kv_segment_ids is not None and kv_segment_ids is not segment_ids and \
            kv_segment_ids.shape != segment_ids.shape:
        raise ValueError("linear attention is self-attention: segment ids of queries and keys "
                         f"must match (got {segment_ids.shape} and {kv_segment_ids.shape}).")
    reasons = []
    for impl in _as_tuple(implementation):
        fn = None if callable(impl) else _LINEAR.get(impl)
        if fn is None:
            reasons.append(f"{getattr(impl, '__name__', impl)}: no linear-attention path")
            continue
        try:
            return fn(q_f, k_f, v, causal=causal, segment_ids=segment_ids,
                      kv_lengths=kv_lengths, chunk=chunk)
        except NotImplementedError as e:
            reasons.append(f"{impl}: {e}")
    raise ValueError(f"implementation={tuple(implementation)} has no linear-attention path for "
                     f"this layer ({'; '.join(reasons)}); append 'xla'.")


def _linear_xla(q_f, k_f, v, *, causal, segment_ids=None, kv_lengths=None, chunk):
    if causal:
        return _linear_chunked(q_f, k_f, v, chunk=chunk,
                                                   segment_ids=segment_ids,
                                                   kv_lengths=kv_lengths)
    if segment_ids is None:
        return _bidirectional(q_f, k_f, v, kv_lengths)
    # Packed encoder batches: the quadratic form, masked by segment (O(T^2) memory).
    return reference.linear_attention(q_f, k_f, v, segment_ids=segment_ids,
                                      kv_lengths=kv_lengths, causal=False)


def _bidirectional(q_f, k_f, v, kv_lengths):
    """``phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)``: linear in the sequence length."""
    b, t, n, f = q_f.shape
    s, k = k_f.shape[1], k_f.shape[2]
    if kv_lengths is not None:
        keep = (jnp.arange(s)[None, :] < kv_lengths[:, None])[:, :, None, None]
        k_f = jnp.where(keep, k_f, 0.0)
    q = q_f.reshape(b, t, k, n // k, f)
    state = jnp.einsum("BSKF,BSKH->BKFH", k_f, v.astype(jnp.float32))
    num = jnp.einsum("BTKGF,BKFH->BTKGH", q, state)
    den = jnp.einsum("BTKGF,BKF->BTKG", q, k_f.sum(axis=1))
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, t, n, -1)


def _linear_pallas(q_f, k_f, v, *, causal, segment_ids=None, kv_lengths=None, chunk):
    if not causal:
        raise NotImplementedError("the kernel computes the causal form; the bidirectional one "
                                  "is two einsums")
    return _linear_pallas_kernel(q_f, k_f, v, chunk=chunk, segment_ids=segment_ids,
                                       kv_lengths=kv_lengths)


register_linear("xla", _linear_xla)
register_linear("pallas", _linear_pallas)
