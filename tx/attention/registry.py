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

from typing import Callable, Sequence

import jax

from kernels import masks as masks_lib
from kernels import reference
from kernels.flash_attention import registry_attention as _pallas
from kernels.paged_attention import paged_attention as _paged_pallas
from tx.parallel import per_shard

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) an implementation; research code may register its own."""
    _REGISTRY[name] = fn


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# Kernels that read a paged KV cache in place (the signature of ``kernels.paged_attention``),
# by implementation name. A paged cache tries them in its ``implementation`` order and attends
# over its gathered pages (``attend``) from the first name that has none.
_PAGED: dict[str, AttentionFn] = {}
_MAX_PAGED_TOKENS = 16  # longer chunks (prefill) attend over gathered pages, with flash


def register_paged(name: str, fn: AttentionFn) -> None:
    """Adds (or replaces) the paged-cache kernel of implementation ``name``."""
    _PAGED[name] = fn


def paged_kernel(name) -> AttentionFn | None:
    return None if callable(name) else _PAGED.get(name)


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


def attend(q, k, v, *, implementation: Sequence = ("xla",), **kwargs) -> jax.Array:
    """Runs the first implementation in ``implementation`` (names or callables) that supports
    the case."""
    implementation = check(implementation)
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
           q_positions=None, kv_positions=None):
    """``jax.nn.dot_product_attention`` with cuDNN, for the cases it expresses exactly."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError("cuDNN needs a GPU")
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
                  k_scales=None, v_scales=None):
    """Our Pallas paged-decode kernel, for the decode steps it is built for (int8 pages with
    their per-token scales included)."""
    t, page = (1 if q.ndim == 3 else q.shape[1]), k_pages.shape[1]
    if t > _MAX_PAGED_TOKENS:
        raise NotImplementedError(f"{t} new tokens: the paged kernel serves decode steps of "
                                  f"up to {_MAX_PAGED_TOKENS}")
    if page & (page - 1):
        raise NotImplementedError(f"page size {page} is not a power of two")
    scales = {} if k_scales is None else {"k_scales": k_scales, "v_scales": v_scales}
    return per_shard.paged(_paged_pallas)(q, k_pages, v_pages, block_tables, lengths,
                                          mask=mask, scale=scale, **scales)


register("xla", reference.attention)
register("cudnn", _cudnn)
register("pallas", per_shard.attention(_pallas))  # per shard under a mesh; GSPMD splits xla
register_paged("pallas", _pallas_paged)
