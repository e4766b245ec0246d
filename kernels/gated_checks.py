"""Host-side validation of the gated linear recurrences (``kernels.gated_linear``,
``kernels.gated_chunked``, ``kernels.gated_reference``, ``kernels.delta_rule``): every bad
argument raises a ValueError naming the parameter, its value and the fix, before tracing."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tx.kernels.common import SUPPORTED_DTYPES, is_int
from tx.kernels.linear_checks import check_rows

__all__ = ["check_gated", "check_chunk", "DEFAULT_CHUNK"]

# Positions per chunk when ``chunk=None``.
DEFAULT_CHUNK = 64


def check_chunk(chunk: Any, *, allow_none: bool = True) -> None:
    if chunk is None and allow_none:
        return
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be >= 1 (an int, positions per chunk); use "
                         f"e.g. chunk={DEFAULT_CHUNK}" + (", or None for the default."
                                                          if allow_none else "."))


def _check_log_decay_values(log_decay: Any) -> None:
    """A concrete ``log_decay`` must be <= 0 (decay ``a = exp(log_decay)`` in (0, 1]); traced
    values cannot be read, the layers guarantee it by their parameterisation."""
    if isinstance(log_decay, jax.core.Tracer):
        return
    arr = np.asarray(log_decay, np.float32)
    if arr.size and not (np.all(arr <= 0) and np.all(~np.isnan(arr))):
        bad = float(np.nanmax(arr)) if np.any(arr > 0) else float("nan")
        raise ValueError(f"log_decay has max={bad}: it must be <= 0 (the decay exp(log_decay) "
                         "must lie in (0, 1]); parameterise it as -softplus(x), log_sigmoid(x) "
                         "or -exp(A_log) * dt.")


def _check_log_decay(log_decay: Any, b: int, t: int, kh: int, dk: int,
                     scalar_decay_only: bool) -> None:
    shape = tuple(getattr(log_decay, "shape", ()) or ())
    allowed = [(b, t, kh)] + ([] if scalar_decay_only else [(b, t, kh, dk)])
    if shape not in allowed:
        want = " or ".join(str(s) for s in allowed)
        raise ValueError(f"log_decay.shape={getattr(log_decay, 'shape', None)} must be {want}:"
                         " [B, T, K] (one decay per head" + ("" if scalar_decay_only else
                         ") or [B, T, K, Dk] (one per key channel") + ").")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
        raise ValueError(f"log_decay.dtype={log_decay.dtype} must be floating; pass the log of "
                         "the decay in float32.")
    _check_log_decay_values(log_decay)


def check_gated(q: Any, k: Any, v: Any, log_decay: Any, *, segment_ids: Any = None,
                kv_lengths: Any = None, chunk: Any = None, beta: Any = None,
                scalar_decay_only: bool = False,
                allow_no_decay: bool = False) -> tuple[int, ...]:
    """Checks shapes, dtypes and a concrete ``log_decay``'s range (``None``: no decay, where
    ``allow_no_decay``); returns ``(B, T, N, K, Dk, Dv, per_channel)``."""
    for name, x, dims in (("q", q, "[B, T, N, Dk]"), ("k", k, "[B, T, K, Dk]"),
                          ("v", v, "[B, T, K, Dv]")):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}.shape={getattr(x, 'shape', None)} must be 4-D {dims}: "
                             "q [B, T, N, Dk], k [B, T, K, Dk], v [B, T, K, Dv].")
    (b, t, n, dk), (bk, tk, kh, dkk), (bv, tv, kv, dv) = q.shape, k.shape, v.shape
    if (bk, tk, dkk) != (b, t, dk):
        raise ValueError(f"k.shape={tuple(k.shape)} must be [B, T, K, Dk] = [{b}, {t}, K, {dk}]"
                         f" to match q.shape={tuple(q.shape)}.")
    if (bv, tv, kv) != (b, t, kh):
        raise ValueError(f"v.shape={tuple(v.shape)} must be [B, T, K, Dv] = [{b}, {t}, {kh}, "
                         f"Dv] to match k.shape={tuple(k.shape)}.")
    if kh < 1 or n % kh:
        raise ValueError(f"num_heads={n} (q.shape[2]) must be a multiple of num_kv_heads={kh} "
                         "(k.shape[2]); choose num_kv_heads dividing num_heads.")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"dtypes must match: q.dtype={q.dtype}, k.dtype={k.dtype}, "
                         f"v.dtype={v.dtype}; cast them to one dtype.")
    if jnp.dtype(v.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"v.dtype={v.dtype} is not supported; cast q, k and v to float32, "
                         "bfloat16 or float16.")
    if log_decay is None and allow_no_decay:  # a_t = 1: plain linear attention
        shape = ()
    else:
        _check_log_decay(log_decay, b, t, kh, dk, scalar_decay_only)
        shape = tuple(log_decay.shape)
    if beta is not None and tuple(getattr(beta, "shape", ()) or ()) != (b, t, kh):
        raise ValueError(f"beta.shape={getattr(beta, 'shape', None)} must be ({b}, {t}, {kh})"
                         " = [B, T, K]: one write strength per position and head.")
    check_rows(segment_ids, kv_lengths, b, t)
    check_chunk(chunk)
    return b, t, n, kh, dk, dv, len(shape) == 4


def mask_invalid(k, v, log_decay, kv_lengths, beta=None):
    """Positions at or past ``kv_lengths`` write nothing and do not decay the state (a padded
    tail leaves the state as the last valid token left it). ``log_decay=None``: no decay."""
    if kv_lengths is None:
        return k, v, log_decay, beta
    t = k.shape[1]
    ok = jnp.arange(t, dtype=jnp.int32)[None, :] < kv_lengths.astype(jnp.int32)[:, None]
    ok3 = ok[:, :, None]
    k = jnp.where(ok3[..., None], k, jnp.zeros((), k.dtype))
    v = jnp.where(ok3[..., None], v, jnp.zeros((), v.dtype))
    if log_decay is not None:
        ok_g = ok3 if log_decay.ndim == 3 else ok3[..., None]
        log_decay = jnp.where(ok_g, log_decay, jnp.zeros((), log_decay.dtype))
    if beta is not None:
        beta = jnp.where(ok3, beta, jnp.zeros((), beta.dtype))
    return k, v, log_decay, beta
