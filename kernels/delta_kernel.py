"""The gated delta rule, chunk by chunk, in portable Pallas: the forward pass (GQA, segment
ids, key lengths); the backward pass recomputes through the chunked ``jnp`` form
(``kernels.delta_rule``) with JAX's autodiff.

Algorithm (Gated DeltaNet, Yang, Kautz & Hatamizadeh, 2025, arXiv:2412.06464; the chunked
form is derived in ``kernels.delta_rule``). Per chunk, with the state ``S`` the chunk starts
from and ``G`` the cumulative log decay from the chunk's start, the corrected values ``d`` solve
the unit lower-triangular system

    (I + diag(beta) L) d = diag(beta) (v - exp(G) k S),   L[t, s] = exp(G_t - G_s) k_t . k_s
                                                            for s < t (same document),

by forward substitution inside the kernel (one row per step: ``C`` small matrix-vector
products); then ``o = exp(G) q S + (q k^T * exp(G_t - G_s))_{s<=t} d`` and
``S <- exp(G_C) S + (k * exp(G_C - G))^T d``. One program per (batch row, query head) walks
the chunks with ``S [Dk, Dv]`` in registers; fp32 arithmetic; Dk, Dv zero-padded to powers of
two >= 16, T to a multiple of the chunk (a Triton tile of >= 16 when compiled).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tx.kernels.common import DEFAULT_LAUNCH, compiler_params, next_pow2, round_up
from tx.kernels.delta_rule import delta_chunked
from tx.kernels.gated_checks import DEFAULT_CHUNK, check_gated, mask_invalid
from tx.kernels.online_softmax import dot as _dot

__all__ = ["delta_rule_attention"]

_MIN_TILE = 16
_HP = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
    seq_len: int
    chunk: int
    key_dim: int
    key_pad: int
    value_dim: int
    value_pad: int
    group: int
    has_segments: bool
    interpret: bool

    @property
    def seq_pad(self) -> int:
        return round_up(self.seq_len, self.chunk)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, *refs, cfg: _Config):
    seg_ref, o_ref = (refs[0], refs[1]) if cfg.has_segments else (None, refs[0])
    c = cfg.chunk
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    row_v = lax.broadcasted_iota(jnp.int32, (c, cfg.value_pad), 0)

    def body(i, carry):
        state, state_seg = carry                                            # [Dk, Dv]
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        q = q_ref[rows, :].astype(jnp.float32)                              # [C, Dk]
        k = k_ref[rows, :].astype(jnp.float32)                              # [C, Dk]
        v = v_ref[rows, :].astype(jnp.float32)                              # [C, Dv]
        g, beta = g_ref[rows], beta_ref[rows]                               # [C]
        mask = row >= col
        use = jnp.ones((c,), bool)
        if cfg.has_segments:
            seg = seg_ref[rows]
            mask = mask & (seg[:, None] == seg[None, :])
            use = seg == state_seg
        decay = jnp.where(mask, jnp.exp(jnp.where(mask, g[:, None] - g[None, :], 0.0)), 0.0)
        lower = jnp.where(row > col, beta[:, None] * _dot(k, k, (1, 1), _HP) * decay, 0.0)
        old = jnp.where(use[:, None], jnp.exp(g)[:, None] * _dot(k, state, (1, 0), _HP), 0.0)
        rhs = beta[:, None] * (v - old)                                     # [C, Dv]

        def solve(r, d):  # row r of (I + lower) d = rhs, rows < r already solved
            l_r = jnp.sum(jnp.where(row == r, lower, 0.0), axis=0)          # [C]
            rhs_r = jnp.sum(jnp.where(row_v == r, rhs, 0.0), axis=0)        # [Dv]
            d_r = rhs_r - jnp.sum(l_r[:, None] * d, axis=0)
            return jnp.where(row_v == r, d_r[None, :], d)

        d = lax.fori_loop(0, c, solve, jnp.zeros((c, cfg.value_pad), jnp.float32))
        inter = jnp.where(use[:, None], jnp.exp(g)[:, None] * _dot(q, state, (1, 0), _HP), 0.0)
        out = inter + _dot(_dot(q, k, (1, 1), _HP) * decay, d, (1, 0), _HP)
        o_ref[rows, :] = out.astype(o_ref.dtype)
        g_last = g_ref[i * c + c - 1]
        k_dec = k * jnp.exp(g_last - g)[:, None]
        carried = jnp.exp(g_last) * state
        if cfg.has_segments:
            last = seg_ref[i * c + c - 1]
            k_dec = jnp.where((seg == last)[:, None], k_dec, 0.0)
            carried = jnp.where(state_seg == last, carried, 0.0)
            state_seg = last
        return carried + _dot(k_dec, d, (0, 0), _HP), state_seg

    state = jnp.zeros((cfg.key_pad, cfg.value_pad), jnp.float32)
    seg0 = seg_ref[0] if cfg.has_segments else jnp.int32(0)
    lax.fori_loop(0, cfg.seq_pad // c, body, (state, seg0))


def _head_major(cfg: _Config, x, dim_pad=None):
    """``[B, T, H(, D)] -> [B, H, T_pad(, D_pad)]`` (zero padded)."""
    pad = ((0, 0), (0, cfg.seq_pad - x.shape[1]), (0, 0))
    if x.ndim == 4:
        pad += ((0, dim_pad - x.shape[3]),)
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x, 2, 1)


def _forward(cfg: _Config, q, k, v, log_decay, beta, segment_ids):
    b, _, n, _ = q.shape
    t, c, grp = cfg.seq_pad, cfg.chunk, cfg.group
    g = jnp.pad(log_decay.astype(jnp.float32), ((0, 0), (0, t - cfg.seq_len), (0, 0)))
    g = jnp.cumsum(g.reshape(b, t // c, c, -1), axis=2).reshape(b, t, -1)
    args = [_head_major(cfg, q, cfg.key_pad), _head_major(cfg, k, cfg.key_pad),
            _head_major(cfg, v, cfg.value_pad), jnp.moveaxis(g, 2, 1),
            _head_major(cfg, beta.astype(jnp.float32))]
    kv = lambda b_, h: (b_, h // grp, 0, 0)  # noqa: E731
    vec = lambda b_, h: (b_, h // grp, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, t, cfg.key_pad), lambda b_, h: (b_, h, 0, 0)),
                pl.BlockSpec((None, None, t, cfg.key_pad), kv),
                pl.BlockSpec((None, None, t, cfg.value_pad), kv),
                pl.BlockSpec((None, None, t), vec), pl.BlockSpec((None, None, t), vec)]
    if cfg.has_segments:
        in_specs.append(pl.BlockSpec((None, t), lambda b_, h: (b_, 0)))
        args.append(jnp.pad(segment_ids.astype(jnp.int32),
                            ((0, 0), (0, t - cfg.seq_len)), mode="edge"))
    out = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg), grid=(b, n), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, t, cfg.value_pad), lambda b_, h: (b_, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, n, t, cfg.value_pad), jnp.float32),
        compiler_params=compiler_params(cfg.interpret, DEFAULT_LAUNCH), interpret=cfg.interpret,
        name="delta_rule_fwd")(*args)
    return jnp.moveaxis(out, 1, 2)[:, :cfg.seq_len, :, :cfg.value_dim].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(cfg: _Config, q, k, v, log_decay, beta, segment_ids):
    return _forward(cfg, q, k, v, log_decay, beta, segment_ids)


def _delta_fwd(cfg, q, k, v, log_decay, beta, segment_ids):
    return _forward(cfg, q, k, v, log_decay, beta, segment_ids), \
        (q, k, v, log_decay, beta, segment_ids)


def _delta_bwd(cfg, saved, do):
    *args, segment_ids = saved
    _, vjp = jax.vjp(lambda *a: delta_chunked(*a, chunk=cfg.chunk, segment_ids=segment_ids),
                     *args)
    return (*vjp(do), None)


_delta.defvjp(_delta_fwd, _delta_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _delta_jit(cfg, q, k, v, log_decay, beta, segment_ids, kv_lengths):
    k, v, log_decay, beta = mask_invalid(k, v, log_decay, kv_lengths, beta)
    return _delta(cfg, q, k, v, log_decay, beta, segment_ids)


def delta_rule_attention(q, k, v, log_decay, beta, *, segment_ids=None, kv_lengths=None,
                         chunk: int | None = None, interpret: bool | None = None):
    """The gated delta rule (same result as ``gated_reference.delta_recurrence``): q
    ``[B,T,N,Dk]``, k ``[B,T,K,Dk]`` (L2-normalised by the caller), v ``[B,T,K,Dv]``,
    log_decay and beta ``[B,T,K]`` -> ``[B,T,N,Dv]`` in v's dtype. Forward in Pallas;
    gradients through ``kernels.delta_rule.delta_chunked``. ``chunk`` (default 64) does not
    change the result; compiled, it is rounded up to a power of two >= 16."""
    _, t, n, kh, dk, dv, _ = check_gated(q, k, v, log_decay, segment_ids=segment_ids,
                                         kv_lengths=kv_lengths, chunk=chunk, beta=beta,
                                         scalar_decay_only=True)
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be True, False or None (interpret mode "
                         "iff no GPU is present).")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    c = min(DEFAULT_CHUNK if chunk is None else chunk, t)
    if not interpret:
        c = max(_MIN_TILE, next_pow2(c))
    cfg = _Config(seq_len=t, chunk=c, key_dim=dk, key_pad=max(_MIN_TILE, next_pow2(dk)),
                  value_dim=dv, value_pad=max(_MIN_TILE, next_pow2(dv)), group=n // kh,
                  has_segments=segment_ids is not None, interpret=bool(interpret))
    return _delta_jit(cfg, q, k, v, log_decay, beta, segment_ids, kv_lengths)
