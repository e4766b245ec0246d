"""Causal linear attention, computed chunkwise, in portable Pallas: forward and backward, GQA,
segment ids (packing) and key lengths.

Algorithm: linear attention with a feature map (Katharopoulos et al., 2020, "Transformers are
RNNs", arXiv:2006.16236), the kernel behind Performer / FAVOR+ (Choromanski et al., 2021,
"Rethinking Attention with Performers", arXiv:2009.14794), computed chunkwise as in
"Transformer Quality in Linear Time" (Hua et al., 2022, arXiv:2202.10447) and
flash-linear-attention (Yang et al., 2024, arXiv:2312.06635). The caller applies the feature
map; the kernel takes non-negative features ``q_f [B,T,N,F]``, ``k_f [B,T,K,F]`` and values
``v [B,T,K,H]`` and returns, with ``A[t, s] = q_f[t] . k_f[s]`` over the visible keys
``s <= t``,

    out[t] = sum_s A[t, s] v[s] / (sum_s A[t, s] + eps)

(zeros where that denominator is 0, e.g. a row that sees no key; zero gradients there too).

Chunkwise form. The ``T`` positions are cut into chunks of ``C``. Inside a chunk the exact
masked quadratic form ``(q_f k_f^T * mask) v`` is used; between chunks a state ``S [F, H] =
sum k_f[s] v[s]^T`` and normaliser ``z [F] = sum k_f[s]`` per (batch row, K/V head) is carried,
and a query adds ``q_f[t] @ S`` / ``q_f[t] . z``. Segment ids (packed documents, which must be
contiguous runs) reset the state: the carried state holds only keys of the segment of the
previous chunk's last token, a query uses it only if it is in that segment, and after a chunk
the state keeps only keys of the chunk's last segment, plus the old state if that segment
continues from the previous chunk. Keys at or past ``kv_lengths`` are invisible.

Backward (recomputation, no per-chunk states are stored). With ``d = den + eps``,
``inv = 1 / d`` and ``gd = -(do . out) * inv`` per query row, the gradient of the scores is
``dA[t, s] = mask * ((do[t] . v[s]) * inv[t] + gd[t])``, so
  * dq runs the forward scan again: ``dq = dA @ k_f`` inside the chunk plus
    ``(do @ S^T) * inv + gd * z`` from the carried state;
  * dk, dv run a reverse scan over chunks carrying ``dS [F, H] = sum (q_f[t] * inv[t]) do[t]^T``
    and ``dz [F] = sum q_f[t] gd[t]`` over later queries of the segment of the next chunk's
    first token: ``dk = dA^T @ q_f + v @ dS^T + dz``, ``dv = (A * inv)^T @ do + k_f @ dS``.

Layout. A program handles one (batch row, group of ``fold`` query heads sharing a K/V head) and
walks the chunks in a ``fori_loop`` with the state in registers. The ``fold`` query heads are
folded into the rows of the q tile, ``[C * fold, F]`` with row ``r`` = (position ``r // fold``,
head ``r % fold``), so each K/V chunk is loaded once for the group and K/V are never repeated in
memory. ``fold`` is the largest power of two dividing ``G = N / K``; when ``G`` is not a power
of two, ``G / fold`` programs share a K/V head and their dk/dv are summed. F and H are
zero-padded to powers of two >= 16, T to a multiple of the chunk.

Chunk sizes. Any ``chunk >= 1`` gives the same result (up to rounding). In interpret mode the
kernel uses exactly the given chunk; compiled through Triton the chunk is rounded up to a
power of two >= 16 (Triton's dot tiles).

Precision. Accumulation is fp32 (scores, states, normaliser). The gradient is a small
difference of large terms (``dq = sum_s (do . (v_s - out)) k_s / d``), so every dot with an fp32
operand (scores, their gradients, the states) keeps ~16 bits of it: with bf16 inputs it is split
into ``hi + lo`` bf16 parts (two bf16 dots), with fp16 inputs it is an fp32 dot (TF32 on a GPU;
unnormalised scores and states can pass fp16's range). The forward output is kept in fp32 for
the backward pass. Measured: bf16 and fp16 results are as close to the fp32 reference as the
rounding of the output itself.

References: ``kernels.reference.linear_attention`` (quadratic) and ``linear_attention_chunked``
below (``lax.scan`` over chunks; the ``xla`` path of the tx layer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tx.kernels.common import DEFAULT_LAUNCH, compiler_params, next_pow2, round_up
from tx.kernels.linear_checks import (DEFAULT_CHUNK, MAX_FEATURES, MAX_HEAD_DIM,  # noqa: F401
                                    check_arguments)
from tx.kernels.linear_chunked import linear_attention_chunked  # noqa: F401 (re-exported)
from tx.kernels.online_softmax import dot as _dot
from tx.kernels.online_softmax import precision as _precision

__all__ = ["linear_attention", "linear_attention_chunked", "check_arguments", "DEFAULT_CHUNK",
           "MAX_FEATURES", "MAX_HEAD_DIM"]

# Chunk (positions per tile) when ``chunk=None``. Interpret mode wants few, wide chunks; on a
# GPU the q tile holds ``chunk * fold`` rows, so the chunk shrinks as the GQA fold grows.
_GPU_MAX_ROWS = 128
_MIN_TILE = 16     # Triton's dot needs >= 16 along every dimension
# The state ``[F, H]`` lives in registers: both are bounded.


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it keys jit and custom_vjp)."""

    seq_len: int        # T
    chunk: int          # C: positions per chunk, as the kernel runs it
    features: int       # F as given
    features_pad: int   # F padded to a power of two >= 16
    head_dim: int       # H as given
    head_dim_pad: int   # H padded to a power of two >= 16
    group: int          # G = N / K
    fold: int           # query heads per program (power of two dividing G)
    eps: float
    has_segments: bool
    interpret: bool

    @property
    def seq_pad(self) -> int:
        return round_up(self.seq_len, self.chunk)

    @property
    def num_chunks(self) -> int:
        return self.seq_pad // self.chunk


def _check_interpret(interpret: Any) -> None:
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be True, False or None (interpret mode "
                         "iff no GPU is present).")


def _group_fold(group: int) -> int:
    """The largest power of two dividing ``group``."""
    return group & -group


def _kernel_chunk(chunk: int | None, seq_len: int, fold: int, interpret: bool) -> int:
    """The chunk the kernel runs: the given one (default ``DEFAULT_CHUNK``, smaller on a GPU as
    the fold grows), never longer than the sequence; compiled, a power of two >= 16."""
    if chunk is None:
        chunk = DEFAULT_CHUNK if interpret else \
            max(_MIN_TILE, min(DEFAULT_CHUNK, _GPU_MAX_ROWS // fold))
    chunk = min(chunk, seq_len)
    if not interpret:
        chunk = max(_MIN_TILE, next_pow2(chunk))
    return chunk


# --- the kernels -------------------------------------------------------------------------------

def _wide_dot(x, w, contract, dtype, w_first=False):
    """``x @ w`` (``w @ x`` if ``w_first``) for a tile ``x`` in the input dtype and an fp32
    operand ``w`` (scores, their gradients, a carried state, queries scaled by ``1 / d``),
    fp32 accumulation.

    The normaliser's gradient cancels the bulk of these terms (``dq = sum_s (do . (v_s -
    out)) k_s / d``), so ``w`` must keep more than bf16's 8 bits: bf16 splits it into
    ``hi + lo`` bf16 parts (two bf16 dots, ~16 bits, the same on CPU and GPU); fp16 (whose
    range unnormalised scores and states can pass) takes an fp32 dot (TF32 on a GPU); fp32 a
    true fp32 dot.
    """
    def dot(a, b, prec):
        return _dot(b, a, contract, prec) if w_first else _dot(a, b, contract, prec)
    if dtype == jnp.float32:
        return dot(x, w, _precision(dtype))
    if dtype == jnp.float16:
        return dot(x.astype(jnp.float32), w, None)
    hi = w.astype(dtype)
    lo = (w - hi.astype(jnp.float32)).astype(dtype)
    return dot(x, hi, None) + dot(x, lo, None)


def _chunk_masks(cfg: _Config, start, len_ref, seg_q_ref, seg_k_ref):
    """The visibility of one chunk: ``mask [R, C]`` (causal, key length, segments), ``key_ok
    [C]`` and the row / key segment ids (None without segments)."""
    c, fold = cfg.chunk, cfg.fold
    rows = c * fold
    row_pos = lax.broadcasted_iota(jnp.int32, (rows, c), 0) // fold
    col_pos = lax.broadcasted_iota(jnp.int32, (rows, c), 1)
    key_ok = start + lax.broadcasted_iota(jnp.int32, (c,), 0) < len_ref[0]   # [C]
    mask = (row_pos >= col_pos) & key_ok[None, :]
    seg_q = seg_k = None
    if cfg.has_segments:
        seg_q = seg_q_ref[pl.ds(start * fold, rows)]                        # [R]
        seg_k = seg_k_ref[pl.ds(start, c)]                                  # [C]
        mask = mask & (seg_q[:, None] == seg_k[None, :])
    return mask, key_ok, seg_q, seg_k


def _refs(cfg: _Config, refs):
    """``(seg_q_ref, seg_k_ref, outputs)``: segment refs follow the other inputs."""
    if cfg.has_segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _forward_kernel(len_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
    seg_q_ref, seg_k_ref, (o_ref, d_ref) = _refs(cfg, refs)
    c, fold = cfg.chunk, cfg.fold
    rows = c * fold
    dtype = q_ref.dtype
    prec = _precision(dtype)

    def body(i, carry):
        state, norm, state_seg = carry                                      # [Fp,Hp], [Fp]
        start = i * c
        row_slice = pl.ds(pl.multiple_of(i * rows, rows), rows)
        mask, key_ok, seg_q, seg_k = _chunk_masks(cfg, start, len_ref, seg_q_ref, seg_k_ref)
        q = q_ref[row_slice, :]                                             # [R, Fp]
        k = jnp.where(key_ok[:, None], k_ref[pl.ds(start, c), :], 0)       # [C, Fp]
        v = jnp.where(key_ok[:, None], v_ref[pl.ds(start, c), :], 0)       # [C, Hp]
        # Inside the chunk: the exact masked quadratic form.
        a = jnp.where(mask, _dot(q, k, (1, 1), prec), 0.0)                  # [R, C]
        num = _wide_dot(v, a, (1, 0), dtype, w_first=True)                  # [R, Hp]
        den = a.sum(axis=1)                                                 # [R]
        # Earlier chunks: the carried state, for rows of the segment it holds.
        num_s = _wide_dot(q, state, (1, 0), dtype)                          # [R, Hp]
        den_s = jnp.sum(q.astype(jnp.float32) * norm[None, :], axis=1)      # [R]
        if cfg.has_segments:
            use = seg_q == state_seg
            num_s, den_s = jnp.where(use[:, None], num_s, 0.0), jnp.where(use, den_s, 0.0)
        num, d = num + num_s, den + den_s + cfg.eps
        ok = d != 0.0
        o_ref[row_slice, :] = jnp.where(ok[:, None], num / jnp.where(ok, d, 1.0)[:, None],
                                        0.0).astype(o_ref.dtype)
        d_ref[row_slice] = d
        # The state after this chunk: keys of its last segment.
        if cfg.has_segments:
            last = seg_k_ref[start + c - 1]
            keep = (seg_k == last)[:, None]
            k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
            carried = state_seg == last
            state, norm = jnp.where(carried, state, 0.0), jnp.where(carried, norm, 0.0)
            state_seg = last
        state = state + _dot(k, v, (0, 0), prec)                            # [Fp, Hp]
        norm = norm + k.astype(jnp.float32).sum(axis=0)                     # [Fp]
        return state, norm, state_seg

    fp, hp = q_ref.shape[-1], v_ref.shape[-1]
    carry = (jnp.zeros((fp, hp), jnp.float32), jnp.zeros((fp,), jnp.float32), jnp.int32(0))
    lax.fori_loop(0, cfg.num_chunks, body, carry)


def _dq_kernel(len_ref, k_ref, v_ref, do_ref, inv_ref, gd_ref, *refs, cfg: _Config):
    seg_q_ref, seg_k_ref, (dq_ref,) = _refs(cfg, refs)
    c, fold = cfg.chunk, cfg.fold
    rows = c * fold
    dtype = k_ref.dtype
    prec = _precision(dtype)

    def body(i, carry):
        state, norm, state_seg = carry
        start = i * c
        row_slice = pl.ds(pl.multiple_of(i * rows, rows), rows)
        mask, key_ok, seg_q, seg_k = _chunk_masks(cfg, start, len_ref, seg_q_ref, seg_k_ref)
        k = jnp.where(key_ok[:, None], k_ref[pl.ds(start, c), :], 0)       # [C, Fp]
        v = jnp.where(key_ok[:, None], v_ref[pl.ds(start, c), :], 0)       # [C, Hp]
        do = do_ref[row_slice, :]                                           # [R, Hp]
        inv, gd = inv_ref[row_slice][:, None], gd_ref[row_slice][:, None]   # [R, 1]
        da = _dot(do, v, (1, 1), prec) * inv + gd                           # [R, C]
        da = jnp.where(mask, da, 0.0)
        dq = _wide_dot(k, da, (1, 0), dtype, w_first=True)                  # [R, Fp]
        dq_s = _wide_dot(do, state, (1, 1), dtype) * inv \
            + gd * norm[None, :]                                            # [R, Fp]
        if cfg.has_segments:
            dq_s = jnp.where((seg_q == state_seg)[:, None], dq_s, 0.0)
        dq_ref[row_slice, :] = dq + dq_s
        if cfg.has_segments:
            last = seg_k_ref[start + c - 1]
            keep = (seg_k == last)[:, None]
            k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
            carried = state_seg == last
            state, norm = jnp.where(carried, state, 0.0), jnp.where(carried, norm, 0.0)
            state_seg = last
        state = state + _dot(k, v, (0, 0), prec)
        norm = norm + k.astype(jnp.float32).sum(axis=0)
        return state, norm, state_seg

    fp, hp = k_ref.shape[-1], v_ref.shape[-1]
    carry = (jnp.zeros((fp, hp), jnp.float32), jnp.zeros((fp,), jnp.float32), jnp.int32(0))
    lax.fori_loop(0, cfg.num_chunks, body, carry)


def _dkv_kernel(len_ref, q_ref, k_ref, v_ref, do_ref, inv_ref, gd_ref, *refs, cfg: _Config):
    seg_q_ref, seg_k_ref, (dk_ref, dv_ref) = _refs(cfg, refs)
    c, fold = cfg.chunk, cfg.fold
    rows = c * fold
    dtype = q_ref.dtype
    prec = _precision(dtype)

    def body(j, carry):
        dstate, dnorm, state_seg = carry                                    # [Fp,Hp], [Fp]
        i = cfg.num_chunks - 1 - j                                          # reverse scan
        start = i * c
        row_slice = pl.ds(pl.multiple_of(i * rows, rows), rows)
        mask, key_ok, seg_q, seg_k = _chunk_masks(cfg, start, len_ref, seg_q_ref, seg_k_ref)
        q = q_ref[row_slice, :]                                             # [R, Fp]
        k = jnp.where(key_ok[:, None], k_ref[pl.ds(start, c), :], 0)       # [C, Fp]
        v = jnp.where(key_ok[:, None], v_ref[pl.ds(start, c), :], 0)       # [C, Hp]
        do = do_ref[row_slice, :]                                           # [R, Hp]
        inv, gd = inv_ref[row_slice][:, None], gd_ref[row_slice][:, None]   # [R, 1]
        # Inside the chunk.
        p = jnp.where(mask, _dot(q, k, (1, 1), prec) * inv, 0.0)            # [R, C]
        da = jnp.where(mask, _dot(do, v, (1, 1), prec) * inv + gd, 0.0)     # [R, C]
        dv = _wide_dot(do, p, (0, 0), dtype, w_first=True)                  # [C, Hp]
        dk = _wide_dot(q, da, (0, 0), dtype, w_first=True)                  # [C, Fp]
        # Later chunks: the reverse state, for keys of the segment it holds.
        dk_s = _wide_dot(v, dstate, (1, 1), dtype) + dnorm[None, :]        # [C, Fp]
        dv_s = _wide_dot(k, dstate, (1, 0), dtype)                          # [C, Hp]
        if cfg.has_segments:
            use = (seg_k == state_seg)[:, None]
            dk_s, dv_s = jnp.where(use, dk_s, 0.0), jnp.where(use, dv_s, 0.0)
        ok = key_ok[:, None]
        dk_ref[pl.ds(start, c), :] = jnp.where(ok, dk + dk_s, 0.0).astype(dk_ref.dtype)
        dv_ref[pl.ds(start, c), :] = jnp.where(ok, dv + dv_s, 0.0).astype(dv_ref.dtype)
        # The reverse state before this chunk: queries of its first segment.
        qs, dos, gds = q, do, gd
        if cfg.has_segments:
            first = seg_k_ref[start]
            keep = (seg_q == first)[:, None]
            qs, dos, gds = jnp.where(keep, q, 0), jnp.where(keep, do, 0), jnp.where(keep, gd, 0.0)
            carried = state_seg == first
            dstate = jnp.where(carried, dstate, 0.0)
            dnorm = jnp.where(carried, dnorm, 0.0)
            state_seg = first
        q_inv = qs.astype(jnp.float32) * inv                                # [R, Fp]
        dstate = dstate + _wide_dot(dos, q_inv, (0, 0), dtype, w_first=True)  # [Fp, Hp]
        dnorm = dnorm + jnp.sum(qs.astype(jnp.float32) * gds, axis=0)       # [Fp]
        return dstate, dnorm, state_seg

    fp, hp = q_ref.shape[-1], v_ref.shape[-1]
    carry = (jnp.zeros((fp, hp), jnp.float32), jnp.zeros((fp,), jnp.float32), jnp.int32(0))
    lax.fori_loop(0, cfg.num_chunks, body, carry)


# --- pallas_call wiring ------------------------------------------------------------------------

def _kv_head(cfg: _Config):
    per_kv = cfg.group // cfg.fold  # programs (head groups) per K/V head
    return lambda h: h // per_kv


def _specs(cfg: _Config, rows_total: int):
    """BlockSpecs over the grid ``(B, N / fold)``: a program sees its whole sequence."""
    kv_head = _kv_head(cfg)
    t_pad = cfg.seq_pad
    return {
        "len": pl.BlockSpec((None, 1), lambda b, h: (b, 0)),
        "rows_f": pl.BlockSpec((None, None, rows_total, cfg.features_pad),
                               lambda b, h: (b, h, 0, 0)),
        "rows_h": pl.BlockSpec((None, None, rows_total, cfg.head_dim_pad),
                               lambda b, h: (b, h, 0, 0)),
        "rows_1": pl.BlockSpec((None, None, rows_total), lambda b, h: (b, h, 0)),
        "k": pl.BlockSpec((None, t_pad, None, cfg.features_pad),
                          lambda b, h: (b, 0, kv_head(h), 0)),
        "v": pl.BlockSpec((None, t_pad, None, cfg.head_dim_pad),
                          lambda b, h: (b, 0, kv_head(h), 0)),
        "seg_q": pl.BlockSpec((None, rows_total), lambda b, h: (b, 0)),
        "seg_k": pl.BlockSpec((None, t_pad), lambda b, h: (b, 0)),
    }


def _call(cfg: _Config, kernel, name, grid, in_specs, args, out_specs, out_shape, segs):
    if cfg.has_segments:
        in_specs, args = in_specs + [segs[0], segs[1]], args + [segs[2], segs[3]]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(cfg.interpret, DEFAULT_LAUNCH), interpret=cfg.interpret,
        name=name,
    )(*args)


def _forward_call(cfg: _Config, lens, q_f, k_p, v_p, seg_q, seg_k):
    b, hg, rows_total, _ = q_f.shape
    sp = _specs(cfg, rows_total)
    segs = (sp["seg_q"], sp["seg_k"], seg_q, seg_k)
    return _call(cfg, _forward_kernel, "linear_attention_fwd", (b, hg),
                 [sp["len"], sp["rows_f"], sp["k"], sp["v"]], [lens, q_f, k_p, v_p],
                 [sp["rows_h"], sp["rows_1"]],
                 [jax.ShapeDtypeStruct((b, hg, rows_total, cfg.head_dim_pad), jnp.float32),
                  jax.ShapeDtypeStruct((b, hg, rows_total), jnp.float32)], segs)


def _dq_call(cfg: _Config, lens, k_p, v_p, do_f, inv, gd, seg_q, seg_k):
    b, hg, rows_total, _ = do_f.shape
    sp = _specs(cfg, rows_total)
    segs = (sp["seg_q"], sp["seg_k"], seg_q, seg_k)
    return _call(cfg, _dq_kernel, "linear_attention_dq", (b, hg),
                 [sp["len"], sp["k"], sp["v"], sp["rows_h"], sp["rows_1"], sp["rows_1"]],
                 [lens, k_p, v_p, do_f, inv, gd], sp["rows_f"],
                 jax.ShapeDtypeStruct((b, hg, rows_total, cfg.features_pad), jnp.float32),
                 segs)


def _dkv_call(cfg: _Config, lens, q_f, k_p, v_p, do_f, inv, gd, seg_q, seg_k):
    b, hg, rows_total, _ = q_f.shape
    sp = _specs(cfg, rows_total)
    segs = (sp["seg_q"], sp["seg_k"], seg_q, seg_k)
    # One output slot per head group; groups sharing a K/V head (G not a power of two) are
    # summed afterwards, in fp32.
    out_dtype = k_p.dtype if cfg.group == cfg.fold else jnp.float32
    t_pad = cfg.seq_pad
    out_specs = [pl.BlockSpec((None, t_pad, None, cfg.features_pad), lambda b, h: (b, 0, h, 0)),
                 pl.BlockSpec((None, t_pad, None, cfg.head_dim_pad), lambda b, h: (b, 0, h, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, t_pad, hg, cfg.features_pad), out_dtype),
                 jax.ShapeDtypeStruct((b, t_pad, hg, cfg.head_dim_pad), out_dtype)]
    return _call(cfg, _dkv_kernel, "linear_attention_dkv", (b, hg),
                 [sp["len"], sp["rows_f"], sp["k"], sp["v"], sp["rows_h"], sp["rows_1"],
                  sp["rows_1"]],
                 [lens, q_f, k_p, v_p, do_f, inv, gd], out_specs, out_shape, segs)


# --- layouts -----------------------------------------------------------------------------------

def _fold_rows(cfg: _Config, x_btnd, dim_pad: int):
    """``[B,T,N,D]`` -> ``[B, N/fold, T_pad*fold, D_pad]``: fold heads into tile rows."""
    b, t, n, d = x_btnd.shape
    x = jnp.pad(x_btnd, ((0, 0), (0, cfg.seq_pad - t), (0, 0), (0, dim_pad - d)))
    x = x.reshape(b, cfg.seq_pad, n // cfg.fold, cfg.fold, dim_pad)
    return x.transpose(0, 2, 1, 3, 4).reshape(b, n // cfg.fold, cfg.seq_pad * cfg.fold,
                                              dim_pad)


def _unfold_rows(cfg: _Config, x_f, dim: int, dtype):
    """Inverse of ``_fold_rows`` (drops the padding)."""
    b, hg, _, dp = x_f.shape
    x = x_f.reshape(b, hg, cfg.seq_pad, cfg.fold, dp).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, cfg.seq_pad, hg * cfg.fold, dp)[:, :cfg.seq_len, :, :dim].astype(dtype)


def _pad_kv(cfg: _Config, x_btkd, dim_pad: int):
    t, d = x_btkd.shape[1], x_btkd.shape[3]
    return jnp.pad(x_btkd, ((0, 0), (0, cfg.seq_pad - t), (0, 0), (0, dim_pad - d)))


def _data(cfg: _Config, b: int, segment_ids, kv_lengths):
    """``lens [B, 1]`` (valid keys, at most T) and the row / key segment ids (or None)."""
    t = cfg.seq_len
    lens = jnp.full((b,), t, jnp.int32) if kv_lengths is None else \
        jnp.clip(kv_lengths.astype(jnp.int32), 0, t)
    seg_q = seg_k = None
    if segment_ids is not None:
        # Edge padding: the padded tail continues the last document (its keys are invisible).
        seg_k = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, cfg.seq_pad - t)),
                        mode="edge")
        seg_q = jnp.repeat(seg_k, cfg.fold, axis=1)  # one id per folded row
    return lens[:, None], seg_q, seg_k


# --- custom_vjp --------------------------------------------------------------------------------

def _forward(cfg: _Config, q_f, k_f, v, segment_ids, kv_lengths):
    lens, seg_q, seg_k = _data(cfg, q_f.shape[0], segment_ids, kv_lengths)
    qf = _fold_rows(cfg, q_f, cfg.features_pad)
    kp, vp = _pad_kv(cfg, k_f, cfg.features_pad), _pad_kv(cfg, v, cfg.head_dim_pad)
    o_f, d = _forward_call(cfg, lens, qf, kp, vp, seg_q, seg_k)
    out = _unfold_rows(cfg, o_f, cfg.head_dim, v.dtype)
    return out, (qf, kp, vp, o_f, d, lens, seg_q, seg_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(cfg: _Config, q_f, k_f, v, segment_ids, kv_lengths):
    return _forward(cfg, q_f, k_f, v, segment_ids, kv_lengths)[0]


def _linear_fwd(cfg: _Config, q_f, k_f, v, segment_ids, kv_lengths):
    out, residuals = _forward(cfg, q_f, k_f, v, segment_ids, kv_lengths)
    return out, residuals


def _linear_bwd(cfg: _Config, saved, do):
    qf, kp, vp, o_f, d, lens, seg_q, seg_k = saved
    do_f = _fold_rows(cfg, do.astype(vp.dtype), cfg.head_dim_pad)
    # Per row: inv = 1/d (0 where the row's output is pinned to 0) and the normaliser's
    # gradient gd = -(do . out) / d.
    ok = d != 0.0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)
    gd = -jnp.sum(do_f.astype(jnp.float32) * o_f.astype(jnp.float32), axis=-1) * inv
    dq_f = _dq_call(cfg, lens, kp, vp, do_f, inv, gd, seg_q, seg_k)
    dk_p, dv_p = _dkv_call(cfg, lens, qf, kp, vp, do_f, inv, gd, seg_q, seg_k)
    b, t_pad, hg = dk_p.shape[:3]
    kh = hg * cfg.fold // cfg.group
    if cfg.group != cfg.fold:  # head groups sharing a K/V head: sum their contributions
        dk_p = dk_p.reshape(b, t_pad, kh, hg // kh, -1).sum(axis=3)
        dv_p = dv_p.reshape(b, t_pad, kh, hg // kh, -1).sum(axis=3)
    dq = _unfold_rows(cfg, dq_f, cfg.features, qf.dtype)
    dk = dk_p[:, :cfg.seq_len, :, :cfg.features].astype(kp.dtype)
    dv = dv_p[:, :cfg.seq_len, :, :cfg.head_dim].astype(vp.dtype)
    return dq, dk, dv, None, None


_linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_jit(cfg: _Config, q_f, k_f, v, segment_ids, kv_lengths):
    return _linear(cfg, q_f, k_f, v, segment_ids, kv_lengths)


# --- public API --------------------------------------------------------------------------------

def linear_attention(q_f: jax.Array, k_f: jax.Array, v: jax.Array, *,
                     segment_ids: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                     chunk: int | None = None, eps: float = 0.0,
                     interpret: bool | None = None) -> jax.Array:
    """Causal linear attention: q_f ``[B,T,N,F]``, k_f ``[B,T,K,F]``, v ``[B,T,K,H]`` ->
    ``[B,T,N,H]`` in v's dtype; differentiable in q_f, k_f and v.

    Same result as ``kernels.reference.linear_attention(..., causal=True)``.

    Args:
      q_f, k_f: featurised queries and keys (non-negative features, e.g. FAVOR+ positive
        random features); the feature map is the caller's.
      segment_ids: ``[B, T]`` int document ids of packed sequences (contiguous runs); a query
        sees only keys of its own document.
      kv_lengths: ``[B]`` int; keys at or past the length are invisible.
      chunk: positions per chunk (static; default ``DEFAULT_CHUNK``, at most T). The result
        does not depend on it; compiled for a GPU it is rounded up to a power of two >= 16.
      eps: added to the denominator (static).
      interpret: run the Pallas interpreter; ``None`` means "iff no GPU is present".
    """
    b, t, _, n, kh, f, h = check_arguments(q_f, k_f, v, segment_ids=segment_ids,
                                           kv_lengths=kv_lengths, chunk=chunk, eps=eps)
    _check_interpret(interpret)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    group = n // kh
    fold = _group_fold(group)
    cfg = _Config(seq_len=t, chunk=_kernel_chunk(chunk, t, fold, interpret), features=f,
                  features_pad=max(_MIN_TILE, next_pow2(f)), head_dim=h,
                  head_dim_pad=max(_MIN_TILE, next_pow2(h)), group=group, fold=fold,
                  eps=float(eps), has_segments=segment_ids is not None,
                  interpret=bool(interpret))
    return _linear_jit(cfg, q_f, k_f, v, segment_ids, kv_lengths)
