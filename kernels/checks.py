"""Host-side argument checks shared by every attention op.

They run on shapes and dtypes only (never on traced values), before anything is compiled, and
each error names the parameter, its value and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tx.kernels import masks as masks_lib
from tx.kernels.block_sizes import MAX_HEAD_DIM
from tx.kernels.common import SUPPORTED_DTYPES


def check_qkv(q: Any, k: Any, v: Any, *,
              value_dim: bool = False) -> tuple[int, int, int, int, int, int]:
    """Checks q ``[B,T,N,H]``, k/v ``[B,S,K,H]``; returns ``(B, T, S, N, K, H)``.

    ``value_dim``: the op takes values of their own head dim, ``v [B,S,K,Hv]`` (MLA's
    expanded form: 192-wide q/k heads, 128-wide values)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}.shape={getattr(x, 'shape', None)} must be 4-D: "
                             "q is [B, T, N, H] and k, v are [B, S, K, H].")
    (b, t, n, h), (bk, s, kh, hk) = q.shape, k.shape
    if value_dim and k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} must agree in [B, S, K].")
    if not value_dim and k.shape != v.shape:
        raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} must match ([B, S, K, H]); "
                         "this op takes no value head dim of its own.")
    if bk != b:
        raise ValueError(f"k.shape[0]={bk} must equal q.shape[0]={b} (batch).")
    if hk != h:
        raise ValueError(f"k head dim k.shape[3]={hk} must equal q.shape[3]={h}; project q, k "
                         "and v to the same head_dim.")
    if kh < 1 or n % kh:
        raise ValueError(f"num_heads={n} (q.shape[2]) must be a multiple of num_kv_heads={kh} "
                         "(k.shape[2]); choose num_kv_heads dividing num_heads.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes must match: q.dtype={q.dtype}, k.dtype={k.dtype}, "
                         f"v.dtype={v.dtype}; cast them to one dtype.")
    return b, t, s, n, kh, h


def check_value_dim(value_dim: Any, h: int, values: Any, scales: Any = None) -> None:
    """``value_dim`` (values = the first ``value_dim`` key columns) against the key head dim
    ``h``; with it no separate values (``values``, ``scales``) may be given."""
    if value_dim is None:
        if values is None:
            raise ValueError("v is None: give the values, or value_dim=<width> to read them "
                             "from the first key columns.")
        return
    if isinstance(value_dim, bool) or not isinstance(value_dim, (int, np.integer)) or \
            not 1 <= value_dim <= h:
        raise ValueError(f"value_dim={value_dim!r} must be an int in [1, {h}] (the key head "
                         "dim): the values are the keys' first value_dim columns.")
    if values is not None or scales is not None:
        raise ValueError(f"value_dim={value_dim} reads the values from the keys: pass v=None "
                         "(and v_scales=None), not separate values.")


def check_mask(mask: Any) -> masks_lib.Mask:
    if mask is None:
        return masks_lib.Full()
    if not isinstance(mask, masks_lib.Mask):
        raise ValueError(f"mask={mask!r} must be a kernels.masks.Mask (e.g. Causal()) or None.")
    return mask


def check_scale(scale: Any, h: int) -> float:
    """The static logit scale as a float; ``None`` means ``h ** -0.5``."""
    if scale is None:
        return float(h) ** -0.5
    if isinstance(scale, (bool, str)) or not np.isscalar(scale) or not np.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite Python float (it is static); "
                         "pass None for head_dim ** -0.5.")
    return float(scale)


def check_segment_ids(segment_ids: Any, b: int, t: int, s: int) -> None:
    if segment_ids is None:
        return
    if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
        raise ValueError("segment_ids must be a pair (q_segment_ids [B, T], kv_segment_ids "
                         f"[B, S]); got {type(segment_ids).__name__}.")
    for name, ids, shape in (("q_segment_ids", segment_ids[0], (b, t)),
                             ("kv_segment_ids", segment_ids[1], (b, s))):
        if tuple(ids.shape) != shape:
            raise ValueError(f"{name}.shape={tuple(ids.shape)} must be {shape} ([B, "
                             f"{'T' if name[0] == 'q' else 'S'}]).")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name}.dtype={ids.dtype} must be an integer dtype (int32).")


def check_kv_lengths(kv_lengths: Any, b: int) -> None:
    if kv_lengths is None:
        return
    if tuple(kv_lengths.shape) != (b,) or not np.issubdtype(kv_lengths.dtype, np.integer):
        raise ValueError(f"kv_lengths (shape {tuple(kv_lengths.shape)}, dtype "
                         f"{kv_lengths.dtype}) must be int32 of shape ({b},): valid keys per "
                         "batch row.")


def check_positions(name: str, positions: Any, b: int, length: int) -> None:
    if positions is None:
        return
    if tuple(positions.shape) != (b, length) or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"{name} (shape {tuple(positions.shape)}, dtype {positions.dtype}) "
                         f"must be int32 of shape ({b}, {length}).")


def check_bias(bias: Any, b: int, t: int, s: int, n: int) -> None:
    if bias is None:
        return
    ok = bias.ndim == 4 and bias.shape[0] in (1, b) and bias.shape[1] in (1, n) \
        and tuple(bias.shape[2:]) == (t, s)
    if not ok:
        raise ValueError(f"bias.shape={tuple(bias.shape)} must be [B or 1, N or 1, T, S] = "
                         f"[{b} or 1, {n} or 1, {t}, {s}].")


def check_dtype_and_head_dim(q, name: str = "q") -> None:
    """The dtypes and head dims the Pallas kernels take (``name``: the argument checked)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}.dtype={q.dtype} is not supported; cast q, k and v to "
                         "float32, bfloat16 or float16.")
    h = q.shape[-1]
    if not 1 <= h <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={h} ({name}.shape[3]) must be in [1, "
                         f"{MAX_HEAD_DIM}]; split larger heads.")
