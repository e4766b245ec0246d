"""The gated delta rule, chunkwise (WY / UT form), in plain ``jnp``: the ``xla`` path of the
Gated DeltaNet layer, differentiated by JAX (also the backward pass of the Pallas forward,
``kernels.delta_kernel``).

Recurrence (Gated DeltaNet, Yang, Kautz & Hatamizadeh, 2025, arXiv:2412.06464; definition in
``kernels.gated_reference.delta_recurrence``), per K/V head with state ``S [Dk, Dv]``:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t.

Chunked form (the WY representation of DeltaNet, Yang et al., 2024, arXiv:2406.06484, with
the decay folded in). Write the update as a gated linear recurrence with a corrected value:
``S_t = a_t S_{t-1} + k_t d_t^T`` with ``d_t = beta_t (v_t - a_t S_{t-1}^T k_t)``. Inside a
chunk starting from ``S_0``, with ``G`` the cumulative log decay from the chunk's start,

    d_t = beta_t (v_t - exp(G_t) S_0^T k_t - sum_{s<t} exp(G_t - G_s) (k_t . k_s) d_s),

a unit lower-triangular system ``(I + diag(beta) L) D = diag(beta) (V - exp(G) K S_0)``. Its
solution is ``D = U - W S_0`` with ``U = T V``, ``W = T exp(G) K``, ``T = (I + diag(beta)
L)^-1 diag(beta)`` (the UT transform): one forward substitution per chunk, batched over chunks,
independent of the state. A scan over chunks then only needs matrix products:

    o_t = exp(G_t) q_t^T S_0 + sum_{s<=t} exp(G_t - G_s) (q_t . k_s) d_s
    S_C = exp(G_C) S_0 + sum_s exp(G_C - G_s) k_s d_s^T.

Documents (``segment_ids``) mask ``L`` and the quadratic form and cut the state, as in
``kernels.gated_chunked``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from tx.kernels.gated_checks import DEFAULT_CHUNK, check_chunk, check_gated, mask_invalid
from tx.kernels.gated_chunked import _chunks, chunk_layout

__all__ = ["delta_chunked"]


def _unit_lower_solve(strict_bcc, rhs_bcd):
    """``X`` with ``(I + strict) X = rhs`` by forward substitution, row by row: row ``r`` is
    ``rhs[r] - strict[r] @ X`` (``strict`` is zero on and above the diagonal, so only the rows
    already solved count). Plain jnp in a loop of ``C`` steps rather than
    ``jax.scipy.linalg.solve_triangular``: the latter's backward, jitted on XLA:CPU, stopped
    returning after its second or third call (B=8, T=128, chunk 16)."""
    c = strict_bcc.shape[-1]

    def row(r, x):
        a_r = lax.dynamic_index_in_dim(strict_bcc, r, axis=-2, keepdims=True)     # [..., 1, C]
        rhs_r = lax.dynamic_index_in_dim(rhs_bcd, r, axis=-2, keepdims=True)      # [..., 1, D]
        new = rhs_r - jnp.matmul(a_r, x, precision=lax.Precision.HIGHEST)
        return lax.dynamic_update_index_in_dim(x, new, r, axis=-2)

    return lax.fori_loop(0, c, row, jnp.zeros_like(rhs_bcd))


def delta_chunked(q, k, v, log_decay, beta, *, chunk: int = DEFAULT_CHUNK, segment_ids=None,
                  kv_lengths=None, initial_state=None, final_state: bool = False):
    """Same result as ``gated_reference.delta_recurrence``: q ``[B,T,N,Dk]``, k ``[B,T,K,Dk]``
    (L2-normalised by the caller, as the delta rule expects), v ``[B,T,K,Dv]``, log_decay and
    beta ``[B,T,K]`` -> ``[B,T,N,Dv]`` in v's dtype (and the final state ``[B,K,Dk,Dv]`` fp32
    with ``final_state=True``). Any ``chunk >= 1``."""
    b, t, n, kh, dk, dv, _ = check_gated(q, k, v, log_decay, segment_ids=segment_ids,
                                         kv_lengths=kv_lengths, chunk=chunk, beta=beta,
                                         scalar_decay_only=True)
    check_chunk(chunk, allow_none=False)
    k, v, log_decay, beta = mask_invalid(k, v, log_decay, kv_lengths, beta)
    grp, c, f32, hp = n // kh, min(chunk, t), jnp.float32, lax.Precision.HIGHEST
    mask, seg, last, prev, cont = chunk_layout(b, t, c, segment_ids)
    qc = _chunks(q.astype(f32).reshape(b, t, kh, grp, dk), c)               # [B,nc,C,K,G,Dk]
    kc, vc = _chunks(k.astype(f32), c), _chunks(v.astype(f32), c)           # [B,nc,C,K,D]
    bc = jnp.moveaxis(_chunks(beta.astype(f32), c), 2, 3)                   # [B,nc,K,C]
    gc = jnp.cumsum(_chunks(log_decay.astype(f32), c), axis=2)
    gc = jnp.moveaxis(gc, 2, 3)                                             # [B,nc,K,C]
    diff = gc[..., :, None] - gc[..., None, :]                              # [B,nc,K,C,C]
    m = mask[:, :, None]
    decay = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)             # s <= t
    strict = decay * (1.0 - jnp.eye(c, dtype=f32))[None, None, None]                        # s < t
    use = (seg == prev[..., None])[:, :, None]                              # [B,nc,1,C]
    # The UT transform, batched over chunks.
    kk = jnp.einsum("BNCKD,BNSKD->BNKCS", kc, kc, precision=hp)
    eye = jnp.eye(c, dtype=f32)[None, None, None]
    lower = eye + bc[..., :, None] * kk * strict                            # [B,nc,K,C,C]
    rhs_u = bc[..., None] * jnp.moveaxis(vc, 2, 3)                          # [B,nc,K,C,Dv]
    rhs_w = jnp.where(use[..., None], (bc * jnp.exp(gc))[..., None], 0.0) * \
        jnp.moveaxis(kc, 2, 3)                                              # [B,nc,K,C,Dk]
    uw = _unit_lower_solve(lower - eye, jnp.concatenate([rhs_u, rhs_w], axis=-1))
    u, w = uw[..., :dv], uw[..., dv:]
    qk = jnp.einsum("BNCKGD,BNSKD->BNKGCS", qc, kc, precision=hp) * decay[:, :, :, None]
    q_in = jnp.where(use[..., None, :, None], jnp.exp(gc)[..., None, :, None] *
                     jnp.moveaxis(qc, 2, 4), 0.0)                           # [B,nc,K,G,C,Dk]
    k_out = jnp.where((seg == last[..., None])[:, :, None, :, None],
                      jnp.exp(gc[..., -1:] - gc)[..., None] * jnp.moveaxis(kc, 2, 3),
                      0.0)                                                  # [B,nc,K,C,Dk]
    g_last = jnp.exp(gc[..., -1])                                           # [B,nc,K]

    def step(state, x):  # state [B,K,Dk,Dv]
        u_c, w_c, qk_c, q_c, k_c, gl_c, cont_c = x
        d = u_c - jnp.einsum("BKCD,BKDH->BKCH", w_c, state, precision=hp)   # [B,K,C,Dv]
        o = jnp.einsum("BKGCD,BKDH->BKGCH", q_c, state, precision=hp) + \
            jnp.einsum("BKGCS,BKSH->BKGCH", qk_c, d, precision=hp)
        new = (cont_c[:, None] * gl_c)[..., None, None] * state + \
            jnp.einsum("BKCD,BKCH->BKDH", k_c, d, precision=hp)
        return new, o

    s0 = jnp.zeros((b, kh, dk, dv), f32) if initial_state is None else \
        initial_state.astype(f32)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, w, qk, q_in, k_out, g_last)) + (cont,)
    s_end, o = lax.scan(step, s0, xs)                                       # [nc,B,K,G,C,Dv]
    out = jnp.transpose(o, (1, 0, 4, 2, 3, 5)).reshape(b, -1, n, dv)[:, :t].astype(v.dtype)
    return (out, s_end) if final_state else out
