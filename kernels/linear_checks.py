"""Host-side validation of ``kernels.linear_attention`` (and its chunkwise jnp form): every
bad argument raises a ValueError naming the parameter, its value and the fix, before tracing."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax.numpy as jnp

from tx.kernels.common import SUPPORTED_DTYPES, is_int

__all__ = ["check_arguments", "DEFAULT_CHUNK", "MAX_FEATURES", "MAX_HEAD_DIM"]

# Chunk (positions per tile) when ``chunk=None``.
DEFAULT_CHUNK = 64
MAX_FEATURES = 256
MAX_HEAD_DIM = 256


def check_arguments(q_f: Any, k_f: Any, v: Any, *, segment_ids: Any = None,
                    kv_lengths: Any = None, chunk: Any = None, eps: Any = 0.0,
                    same_length: bool = True, limits: bool = True) -> tuple[int, ...]:
    """Checks shapes and dtypes (never values); returns ``(B, T, S, N, K, F, H)``.

    ``same_length``: keys and queries share the length T (causal self-attention);
    ``limits``: F and H within the kernel's register budget.
    """
    for name, x, dims in (("q_f", q_f, "[B, T, N, F]"), ("k_f", k_f, "[B, S, K, F]"),
                          ("v", v, "[B, S, K, H]")):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}.shape={getattr(x, 'shape', None)} must be 4-D {dims}: "
                             "q_f [B, T, N, F], k_f [B, S, K, F], v [B, S, K, H].")
    (b, t, n, f), (bk, s, kh, fk), (bv, sv, kv, h) = q_f.shape, k_f.shape, v.shape
    if bk != b or bv != b:
        raise ValueError(f"batch: k_f.shape[0]={bk} and v.shape[0]={bv} must equal "
                         f"q_f.shape[0]={b}.")
    if same_length and s != t:
        raise ValueError(f"k_f.shape[1]={s} must equal q_f.shape[1]={t}: causal linear "
                         "attention is self-attention over one sequence of length T.")
    if (sv, kv) != (s, kh):
        raise ValueError(f"v.shape={tuple(v.shape)} must be [B, S, K, H] = [{b}, {s}, {kh}, H] "
                         f"to match k_f.shape={tuple(k_f.shape)}.")
    if fk != f:
        raise ValueError(f"features k_f.shape[3]={fk} must equal q_f.shape[3]={f}; apply the "
                         "same feature map to queries and keys.")
    if kh < 1 or n % kh:
        raise ValueError(f"num_heads={n} (q_f.shape[2]) must be a multiple of num_kv_heads={kh}"
                         " (k_f.shape[2]); choose num_kv_heads dividing num_heads.")
    if not q_f.dtype == k_f.dtype == v.dtype:
        raise ValueError(f"dtypes must match: q_f.dtype={q_f.dtype}, k_f.dtype={k_f.dtype}, "
                         f"v.dtype={v.dtype}; cast them to one dtype.")
    if jnp.dtype(v.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"v.dtype={v.dtype} is not supported; cast q_f, k_f and v to float32, "
                         "bfloat16 or float16.")
    if limits and not 1 <= f <= MAX_FEATURES:
        raise ValueError(f"features={f} (q_f.shape[3]) must be in [1, {MAX_FEATURES}]: the "
                         "[F, H] state lives in registers; use fewer random features.")
    if limits and not 1 <= h <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={h} (v.shape[3]) must be in [1, {MAX_HEAD_DIM}]; split "
                         "larger heads.")
    check_rows(segment_ids, kv_lengths, b, t)
    if chunk is not None and (not is_int(chunk) or chunk < 1):
        raise ValueError(f"chunk={chunk!r} must be >= 1 (an int, positions per chunk); use "
                         f"e.g. chunk={DEFAULT_CHUNK}, or None for the default.")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"eps={eps!r} must be a finite Python float >= 0 (added to the "
                         "denominator); use e.g. eps=1e-6, or 0.0.")
    return b, t, s, n, kh, f, h


def check_rows(segment_ids, kv_lengths, b: int, t: int) -> None:
    """Packing ids ``[B, T]`` and key lengths ``[B]`` of a linear or recurrent call: integer
    arrays of those shapes (or None)."""
    if segment_ids is not None:
        if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids.shape={getattr(segment_ids, 'shape', None)} must be "
                             f"({b}, {t}) = [B, T]: one int32 document id per position.")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids.dtype={segment_ids.dtype} must be an integer dtype; "
                             "pass int32 document ids.")
    if kv_lengths is not None:
        if not hasattr(kv_lengths, "shape") or tuple(kv_lengths.shape) != (b,):
            raise ValueError(f"kv_lengths.shape={getattr(kv_lengths, 'shape', None)} must be "
                             f"({b},) = [B]: valid keys per batch row.")
        if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
            raise ValueError(f"kv_lengths.dtype={kv_lengths.dtype} must be an integer dtype; "
                             "pass int32 lengths.")
