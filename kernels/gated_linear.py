"""Decay-gated linear recurrences, chunk by chunk, in portable Pallas: forward and backward,
GQA, segment ids (packing), key lengths, a decay per head or per key channel.

Algorithm: the chunkwise form of gated linear attention (GLA, Yang et al., 2024,
arXiv:2312.06635; RetNet, Sun et al., 2023, arXiv:2307.08621; Mamba-2's SSD, Dao & Gu, 2024,
arXiv:2405.21060) for ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``, ``a_t =
exp(g_t)`` with ``g = log_decay <= 0`` (definition: ``kernels.gated_reference``; the same
algorithm in ``jnp``: ``kernels.gated_chunked``, which explains the formulas). ``G`` is the
cumulative log decay from the chunk's start, computed outside the kernel; every exponent the
kernel takes is a difference ``G_t - G_s`` with ``s <= t`` or ``G_t`` itself, so <= 0.

Backward (recomputation, no per-chunk states stored):
  * dq runs the forward scan again: ``dq_t = sum_s (do_t . v_s) k_s * exp(G_t - G_s)
    + exp(G_t) * (S_0 do_t)``;
  * dk, dv run a reverse scan carrying ``dS = sum_t (q_t * exp(G_t))^T do_t`` over later
    chunks of the same document: ``dk_s = sum_t (do_t . v_s) q_t * exp(G_t - G_s) + exp(G_C -
    G_s) * (dS v_s)``, ``dv_s = sum_t A_ts do_t + (k_s * exp(G_C - G_s)) dS``;
  * the log decay needs no kernel: ``o`` depends on ``g`` only through ``B_t - B_s`` (``B``
    the cumulative log decay over the sequence) in products with ``q_t k_s``, so
    ``dL/dB_t = q_t * dq_t - k_t * dk_t`` and ``dg_t = sum_{r >= t} dL/dB_r`` (a reverse
    cumsum; every whole document sums to 0, so it needs no segment masking).

Layout: one program per (batch row, query head) walks the chunks in a ``fori_loop`` with the
state ``[Dk, Dv]`` in registers; query heads sharing a K/V head (GQA) load the same K/V tiles
(no copy in memory) and their dk/dv are summed in fp32 afterwards. Dk and Dv are zero-padded to
powers of two >= 16, T to a multiple of the chunk. Arithmetic is fp32 (inputs are cast as the
tiles are loaded; fp32 dots are exact, IEEE, on a GPU).

Chunk sizes: any ``chunk >= 1`` gives the same result up to rounding. A per-channel decay
holds a ``[C, C, Dk]`` decay tile, so its default chunk is smaller. Compiled through Triton the
chunk is rounded up to a power of two >= 16.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tx.kernels.common import DEFAULT_LAUNCH, compiler_params, next_pow2, round_up
from tx.kernels.gated_checks import DEFAULT_CHUNK, check_gated, mask_invalid
from tx.kernels.online_softmax import dot as _dot

__all__ = ["gated_linear_attention", "DEFAULT_CHUNK"]

_MIN_TILE = 16       # Triton's dot needs >= 16 along every dimension
_CHANNEL_CHUNK = 16  # default chunk with a per-channel decay ([C, C, Dk] tile)
_HP = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: keys jit and custom_vjp)."""

    seq_len: int
    chunk: int
    key_dim: int
    key_pad: int
    value_dim: int
    value_pad: int
    group: int          # G = N / K
    per_channel: bool   # log_decay [B,T,K,Dk] (else [B,T,K])
    has_segments: bool
    interpret: bool

    @property
    def seq_pad(self) -> int:
        return round_up(self.seq_len, self.chunk)

    @property
    def num_chunks(self) -> int:
        return self.seq_pad // self.chunk


# --- kernel pieces -----------------------------------------------------------------------------

def _load(cfg: _Config, i, q_ref, k_ref, v_ref, g_ref, seg_ref):
    """One chunk's tiles in fp32, its mask ``[C, C]`` and segment ids ``[C]`` (or None)."""
    c = cfg.chunk
    rows = pl.ds(pl.multiple_of(i * c, c), c)
    q = None if q_ref is None else q_ref[rows, :].astype(jnp.float32)      # [C, Dk]
    k = k_ref[rows, :].astype(jnp.float32)                                  # [C, Dk]
    v = v_ref[rows, :].astype(jnp.float32)                                  # [C, Dv]
    g = g_ref[rows, :] if cfg.per_channel else g_ref[rows]                 # [C, Dk] | [C]
    t_idx = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    s_idx = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    mask = t_idx >= s_idx
    seg = None
    if cfg.has_segments:
        seg = seg_ref[rows]                                                 # [C]
        mask = mask & (seg[:, None] == seg[None, :])
    return q, k, v, g, mask, seg


def _decay(cfg: _Config, g, mask):
    """``exp(G_t - G_s)`` where visible, else 0: ``[C, C]`` or ``[C, C, Dk]``."""
    if cfg.per_channel:
        m = mask[:, :, None]
        diff = g[:, None, :] - g[None, :, :]
    else:
        m, diff = mask, g[:, None] - g[None, :]
    return jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)


def _scores(cfg: _Config, q, k, e):
    """``A[t, s] = sum_d q_td k_sd e_tsd`` ``[C, C]``."""
    if cfg.per_channel:
        return jnp.sum(q[:, None, :] * k[None, :, :] * e, axis=2)
    return _dot(q, k, (1, 1), _HP) * e


def _g_col(cfg: _Config, g):
    return g if cfg.per_channel else g[:, None]                             # [C, Dk|1]


def _g_last(cfg: _Config, g_ref, i):
    """``G`` at the chunk's last position: ``[1, Dk]`` or ``[1, 1]``."""
    idx = i * cfg.chunk + cfg.chunk - 1
    if cfg.per_channel:
        return g_ref[pl.ds(idx, 1), :]
    return jnp.full((1, 1), g_ref[idx], jnp.float32)


def _refs(cfg: _Config, refs):
    if cfg.has_segments:
        return refs[0], refs[1:]
    return None, refs


def _carry(cfg: _Config, i, state, state_seg, k, v, g_ref, gcol, seg, seg_ref):
    """The state after chunk ``i`` (the forward's and the dq kernel's recurrence): the old
    state decayed over the chunk plus its keys decayed to the chunk's end; a document that
    ends inside the chunk leaves nothing behind. Returns ``(state, its document id)``."""
    c = cfg.chunk
    g_last = _g_last(cfg, g_ref, i)                                         # [1, Dk|1]
    k_dec = k * jnp.exp(g_last - gcol)                                      # [C, Dk]
    carried = jnp.exp(g_last).reshape(-1, 1) * state
    if cfg.has_segments:
        last = seg_ref[i * c + c - 1]
        k_dec = jnp.where((seg == last)[:, None], k_dec, 0.0)
        carried = jnp.where(state_seg == last, carried, 0.0)
        state_seg = last
    return carried + _dot(k_dec, v, (0, 0), _HP), state_seg


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, *refs, cfg: _Config):
    seg_ref, (o_ref,) = _refs(cfg, refs)
    c = cfg.chunk

    def body(i, carry):
        state, state_seg = carry                                            # [Dk, Dv]
        q, k, v, g, mask, seg = _load(cfg, i, q_ref, k_ref, v_ref, g_ref, seg_ref)
        a = _scores(cfg, q, k, _decay(cfg, g, mask))                        # [C, C]
        out = _dot(a, v, (1, 0), _HP)                                       # [C, Dv]
        gcol = _g_col(cfg, g)
        inter = _dot(q * jnp.exp(gcol), state, (1, 0), _HP)                 # [C, Dv]
        if cfg.has_segments:
            inter = jnp.where((seg == state_seg)[:, None], inter, 0.0)
        o_ref[pl.ds(pl.multiple_of(i * c, c), c), :] = (out + inter).astype(o_ref.dtype)
        return _carry(cfg, i, state, state_seg, k, v, g_ref, gcol, seg, seg_ref)

    state = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    seg0 = seg_ref[0] if cfg.has_segments else jnp.int32(0)
    lax.fori_loop(0, cfg.num_chunks, body, (state, seg0))


def _dq_kernel(k_ref, v_ref, g_ref, do_ref, *refs, cfg: _Config):
    seg_ref, (dq_ref,) = _refs(cfg, refs)
    c = cfg.chunk

    def body(i, carry):
        state, state_seg = carry
        _, k, v, g, mask, seg = _load(cfg, i, None, k_ref, v_ref, g_ref, seg_ref)
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        do = do_ref[rows, :].astype(jnp.float32)                            # [C, Dv]
        e = _decay(cfg, g, mask)
        da = _dot(do, v, (1, 1), _HP)                                       # [C, C]
        if cfg.per_channel:
            dq = jnp.sum(da[:, :, None] * k[None, :, :] * e, axis=1)        # [C, Dk]
        else:
            dq = _dot(da * e, k, (1, 0), _HP)
        gcol = _g_col(cfg, g)
        dq_s = jnp.exp(gcol) * _dot(do, state, (1, 1), _HP)                 # [C, Dk]
        if cfg.has_segments:
            dq_s = jnp.where((seg == state_seg)[:, None], dq_s, 0.0)
        dq_ref[rows, :] = dq + dq_s
        return _carry(cfg, i, state, state_seg, k, v, g_ref, gcol, seg, seg_ref)

    state = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    seg0 = seg_ref[0] if cfg.has_segments else jnp.int32(0)
    lax.fori_loop(0, cfg.num_chunks, body, (state, seg0))


def _dkv_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, *refs, cfg: _Config):
    seg_ref, (dk_ref, dv_ref) = _refs(cfg, refs)
    c = cfg.chunk

    def body(j, carry):
        dstate, state_seg = carry                                           # [Dk, Dv]
        i = cfg.num_chunks - 1 - j                                          # reverse scan
        q, k, v, g, mask, seg = _load(cfg, i, q_ref, k_ref, v_ref, g_ref, seg_ref)
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        do = do_ref[rows, :].astype(jnp.float32)                            # [C, Dv]
        e = _decay(cfg, g, mask)
        a = _scores(cfg, q, k, e)                                           # [C, C]
        da = _dot(do, v, (1, 1), _HP)                                       # [C, C]
        dv = _dot(a, do, (0, 0), _HP)                                       # [C, Dv]
        if cfg.per_channel:
            dk = jnp.sum(da[:, :, None] * q[:, None, :] * e, axis=0)        # [C, Dk]
        else:
            dk = _dot(da * e, q, (0, 0), _HP)
        # Later chunks, through the state this chunk leaves (keys of its document).
        gcol = _g_col(cfg, g)
        g_last = _g_last(cfg, g_ref, i)
        dec = jnp.exp(g_last - gcol)                                        # [C, Dk|1]
        dk_s = dec * _dot(v, dstate, (1, 1), _HP)                           # [C, Dk]
        dv_s = _dot(k * dec, dstate, (1, 0), _HP)                           # [C, Dv]
        if cfg.has_segments:
            use = (seg == state_seg)[:, None]
            dk_s, dv_s = jnp.where(use, dk_s, 0.0), jnp.where(use, dv_s, 0.0)
        dk_ref[rows, :] = dk + dk_s
        dv_ref[rows, :] = dv + dv_s
        # The state gradient before this chunk: queries of its first document.
        q_dec = q * jnp.exp(gcol)
        carried = jnp.exp(g_last).reshape(-1, 1) * dstate
        if cfg.has_segments:
            first = seg_ref[i * c]
            q_dec = jnp.where((seg == first)[:, None], q_dec, 0.0)
            carried = jnp.where(state_seg == first, carried, 0.0)
            state_seg = first
        return carried + _dot(q_dec, do, (0, 0), _HP), state_seg

    dstate = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    lax.fori_loop(0, cfg.num_chunks, body, (dstate, jnp.int32(-1)))


# --- pallas_call wiring ------------------------------------------------------------------------

def _specs(cfg: _Config):
    """BlockSpecs over the grid ``(B, N)``: a program sees its head's whole sequence."""
    t, grp = cfg.seq_pad, cfg.group
    kv = lambda b, h: (b, h // grp, 0, 0)  # noqa: E731
    g_spec = pl.BlockSpec((None, None, t, cfg.key_pad), kv) if cfg.per_channel else \
        pl.BlockSpec((None, None, t), lambda b, h: (b, h // grp, 0))
    return {
        "q": pl.BlockSpec((None, None, t, cfg.key_pad), lambda b, h: (b, h, 0, 0)),
        "o": pl.BlockSpec((None, None, t, cfg.value_pad), lambda b, h: (b, h, 0, 0)),
        "k": pl.BlockSpec((None, None, t, cfg.key_pad), kv),
        "v": pl.BlockSpec((None, None, t, cfg.value_pad), kv),
        "g": g_spec,
        "seg": pl.BlockSpec((None, t), lambda b, h: (b, 0)),
    }


def _call(cfg: _Config, kernel, name, in_keys, args, seg, out_keys, out_dims, b, n):
    sp = _specs(cfg)
    in_specs = [sp[x] for x in in_keys]
    if cfg.has_segments:
        in_specs, args = in_specs + [sp["seg"]], list(args) + [seg]
    out_shape = [jax.ShapeDtypeStruct((b, n, cfg.seq_pad, d), jnp.float32) for d in out_dims]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=(b, n), in_specs=in_specs,
        out_specs=[sp[x] for x in out_keys], out_shape=out_shape,
        compiler_params=compiler_params(cfg.interpret, DEFAULT_LAUNCH), interpret=cfg.interpret,
        name=name)(*args)


def _head_major(cfg: _Config, x, dim_pad):
    """``[B, T, H, D] -> [B, H, T_pad, D_pad]`` (zero padded)."""
    t, d = x.shape[1], x.shape[3]
    x = jnp.pad(x, ((0, 0), (0, cfg.seq_pad - t), (0, 0), (0, dim_pad - d)))
    return x.transpose(0, 2, 1, 3)


def _inputs(cfg: _Config, q, k, v, log_decay, segment_ids):
    b, t = k.shape[:2]
    c, nc = cfg.chunk, cfg.num_chunks
    g = jnp.pad(log_decay.astype(jnp.float32),
                ((0, 0), (0, cfg.seq_pad - t)) + ((0, 0),) * (log_decay.ndim - 2))
    g = jnp.cumsum(g.reshape(b, nc, c, *g.shape[2:]), axis=2).reshape(g.shape)
    if cfg.per_channel:
        g = _head_major(cfg, g, cfg.key_pad)                                # [B,K,Tp,Dkp]
    else:
        g = g.transpose(0, 2, 1)                                            # [B,K,Tp]
    seg = None
    if segment_ids is not None:
        # Edge padding: the padded tail continues the last document (it writes nothing).
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, cfg.seq_pad - t)),
                      mode="edge")
    return (_head_major(cfg, q, cfg.key_pad), _head_major(cfg, k, cfg.key_pad),
            _head_major(cfg, v, cfg.value_pad), g, seg)


def _from_head_major(cfg: _Config, x, dim, dtype):
    return x.transpose(0, 2, 1, 3)[:, :cfg.seq_len, :, :dim].astype(dtype)


# --- custom_vjp --------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(cfg: _Config, q, k, v, log_decay, segment_ids):
    return _gated_fwd(cfg, q, k, v, log_decay, segment_ids)[0]


def _gated_fwd(cfg: _Config, q, k, v, log_decay, segment_ids):
    qh, kh_, vh, g, seg = _inputs(cfg, q, k, v, log_decay, segment_ids)
    b, n = q.shape[0], q.shape[2]
    (o,) = _call(cfg, _forward_kernel, "gated_linear_fwd", ("q", "k", "v", "g"),
                 (qh, kh_, vh, g), seg, ("o",), (cfg.value_pad,), b, n)
    out = _from_head_major(cfg, o, cfg.value_dim, v.dtype)
    return out, (q, k, v, log_decay, segment_ids)


def _gated_bwd(cfg: _Config, saved, do):
    q, k, v, log_decay, segment_ids = saved
    qh, kh_, vh, g, seg = _inputs(cfg, q, k, v, log_decay, segment_ids)
    b, t, n, _ = q.shape
    kh = k.shape[2]
    doh = _head_major(cfg, do.astype(jnp.float32), cfg.value_pad)
    (dq,) = _call(cfg, _dq_kernel, "gated_linear_dq", ("k", "v", "g", "o"),
                  (kh_, vh, g, doh), seg, ("q",), (cfg.key_pad,), b, n)
    dk, dv = _call(cfg, _dkv_kernel, "gated_linear_dkv", ("q", "k", "v", "g", "o"),
                   (qh, kh_, vh, g, doh), seg, ("q", "o"), (cfg.key_pad, cfg.value_pad), b, n)
    f32 = jnp.float32
    dq = _from_head_major(cfg, dq, cfg.key_dim, f32)                        # [B,T,N,Dk]
    # Query heads sharing a K/V head: sum their dk, dv.
    dk = _from_head_major(cfg, dk, cfg.key_dim, f32).reshape(b, t, kh, cfg.group, -1).sum(3)
    dv = _from_head_major(cfg, dv, cfg.value_dim, f32).reshape(b, t, kh, cfg.group, -1).sum(3)
    # dL/dB_t = q_t * dq_t - k_t * dk_t, then a reverse cumsum over the sequence.
    qdq = (q.astype(f32) * dq).reshape(b, t, kh, cfg.group, -1).sum(3)
    db = qdq - k.astype(f32) * dk                                           # [B,T,K,Dk]
    if not cfg.per_channel:
        db = db.sum(-1)
    dg = jnp.flip(jnp.cumsum(jnp.flip(db, 1), axis=1), 1)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dg.astype(log_decay.dtype), None)


_gated.defvjp(_gated_fwd, _gated_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _gated_jit(cfg: _Config, q, k, v, log_decay, segment_ids, kv_lengths):
    k, v, log_decay, _ = mask_invalid(k, v, log_decay, kv_lengths)
    return _gated(cfg, q, k, v, log_decay, segment_ids)


def _kernel_chunk(chunk, seq_len: int, per_channel: bool, interpret: bool) -> int:
    if chunk is None:
        chunk = _CHANNEL_CHUNK if per_channel else DEFAULT_CHUNK
    chunk = min(chunk, seq_len)
    if not interpret:
        chunk = max(_MIN_TILE, next_pow2(chunk))
    return chunk


def gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, *,
                           segment_ids: jax.Array | None = None,
                           kv_lengths: jax.Array | None = None, chunk: int | None = None,
                           interpret: bool | None = None) -> jax.Array:
    """``S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``: q ``[B,T,N,Dk]``,
    k ``[B,T,K,Dk]``, v ``[B,T,K,Dv]``, log_decay ``[B,T,K]`` or ``[B,T,K,Dk]`` (<= 0) ->
    ``[B,T,N,Dv]`` in v's dtype; differentiable in q, k, v and log_decay.

    Same result as ``kernels.gated_reference.gated_recurrence``.

    Args:
      segment_ids: ``[B, T]`` int document ids (contiguous runs); each document starts from a
        zero state.
      kv_lengths: ``[B]`` int; positions at or past it neither write nor decay the state.
      chunk: positions per chunk (static; default 64, 16 with a per-channel decay). The result
        does not depend on it; compiled for a GPU it is rounded up to a power of two >= 16.
      interpret: run the Pallas interpreter; ``None`` means "iff no GPU is present".
    """
    _, t, n, kh, dk, dv, per_channel = check_gated(
        q, k, v, log_decay, segment_ids=segment_ids, kv_lengths=kv_lengths, chunk=chunk)
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be True, False or None (interpret mode "
                         "iff no GPU is present).")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = _Config(seq_len=t, chunk=_kernel_chunk(chunk, t, per_channel, interpret),
                  key_dim=dk, key_pad=max(_MIN_TILE, next_pow2(dk)), value_dim=dv,
                  value_pad=max(_MIN_TILE, next_pow2(dv)), group=n // kh,
                  per_channel=per_channel, has_segments=segment_ids is not None,
                  interpret=bool(interpret))
    return _gated_jit(cfg, q, k, v, log_decay, segment_ids, kv_lengths)
