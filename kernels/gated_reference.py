"""Gated linear recurrences, step by step in plain ``jnp``: the definition the chunked forms
(``kernels.gated_chunked``, ``kernels.gated_linear``, ``kernels.delta_rule``) are checked against.

Decay-gated linear attention (RetNet, Sun et al., 2023, arXiv:2307.08621; GLA, Yang et al.,
2024, arXiv:2312.06635; Mamba-2's SSD, Dao & Gu, 2024, arXiv:2405.21060), per K/V head,
with a state ``S [Dk, Dv]``:

    S_t = a_t * S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t,     a_t = exp(log_decay_t) in (0, 1]

``a_t`` is one number per head (``log_decay [B, T, K]``) or one per key channel
(``[B, T, K, Dk]``, scaling the rows of ``S``). The gated delta rule (Gated DeltaNet, Yang et
al., 2025, arXiv:2412.06464) writes with strength ``beta_t`` after erasing the old value at
``k_t``:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.

Query heads share their K/V head's state (GQA). A new document (``segment_ids`` changes)
starts from a zero state; positions at or past ``kv_lengths`` neither write nor decay.
Accumulation in fp32; outputs in v's dtype. ``final_state=True`` also returns ``S_T``
``[B, K, Dk, Dv]`` (the decoding state), ``initial_state`` starts from a given one.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from tx.kernels.gated_checks import check_gated, mask_invalid

__all__ = ["gated_recurrence", "delta_recurrence"]


def _resets(segment_ids, b, t):
    if segment_ids is None:
        return jnp.zeros((t, b), bool)
    seg = segment_ids.astype(jnp.int32)
    first = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return first.T


def _scan(step, q, k, v, log_decay, beta, segment_ids, initial_state):
    b, t, n, dk = q.shape
    kh, dv = k.shape[2], v.shape[3]
    g = n // kh
    f32 = jnp.float32
    decay = jnp.exp(log_decay.astype(f32))
    decay = decay[..., None] if decay.ndim == 3 else decay                  # [B,T,K,Dk|1]
    beta = jnp.ones((b, t, kh), f32) if beta is None else beta.astype(f32)
    xs = (jnp.moveaxis(q.astype(f32).reshape(b, t, kh, g, dk), 1, 0),
          jnp.moveaxis(k.astype(f32), 1, 0), jnp.moveaxis(v.astype(f32), 1, 0),
          jnp.moveaxis(decay, 1, 0), jnp.moveaxis(beta, 1, 0), _resets(segment_ids, b, t))
    s0 = jnp.zeros((b, kh, dk, dv), f32) if initial_state is None else \
        initial_state.astype(f32)

    def body(s, x):
        q_t, k_t, v_t, a_t, beta_t, reset = x
        s = jnp.where(reset[:, None, None, None], 0.0, s)
        s = step(s, k_t, v_t, a_t, beta_t)
        return s, jnp.einsum("BKGD,BKDH->BKGH", q_t, s, precision="highest")

    s_final, o = lax.scan(body, s0, xs)
    return jnp.moveaxis(o, 0, 1).reshape(b, t, n, dv), s_final


def gated_recurrence(q, k, v, log_decay, *, segment_ids=None, kv_lengths=None,
                     initial_state=None, final_state: bool = False):
    """``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``, one step at a time.

    q ``[B,T,N,Dk]``, k ``[B,T,K,Dk]``, v ``[B,T,K,Dv]``, log_decay ``[B,T,K]`` or
    ``[B,T,K,Dk]`` (<= 0) -> o ``[B,T,N,Dv]`` (and ``S_T [B,K,Dk,Dv]`` fp32 if
    ``final_state``)."""
    check_gated(q, k, v, log_decay, segment_ids=segment_ids, kv_lengths=kv_lengths)
    k, v, log_decay, _ = mask_invalid(k, v, log_decay, kv_lengths)

    def step(s, k_t, v_t, a_t, beta_t):  # s [B,K,Dk,Dv], a_t [B,K,Dk|1]
        return a_t[..., None] * s + k_t[..., :, None] * v_t[..., None, :]

    o, s = _scan(step, q, k, v, log_decay, None, segment_ids, initial_state)
    o = o.astype(v.dtype)
    return (o, s) if final_state else o


def delta_recurrence(q, k, v, log_decay, beta, *, segment_ids=None, kv_lengths=None,
                     initial_state=None, final_state: bool = False):
    """``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t``,
    one step at a time; log_decay ``[B,T,K]`` (one decay per head), beta ``[B,T,K]``."""
    check_gated(q, k, v, log_decay, segment_ids=segment_ids, kv_lengths=kv_lengths,
                beta=beta, scalar_decay_only=True)
    k, v, log_decay, beta = mask_invalid(k, v, log_decay, kv_lengths, beta)

    def step(s, k_t, v_t, a_t, beta_t):
        s = a_t[..., None] * s
        old = jnp.einsum("BKD,BKDH->BKH", k_t, s, precision="highest")      # value at k_t
        write = beta_t[..., None] * (v_t - old)
        return s + k_t[..., :, None] * write[..., None, :]

    o, s = _scan(step, q, k, v, log_decay, beta, segment_ids, initial_state)
    o = o.astype(v.dtype)
    return (o, s) if final_state else o
