"""Decay-gated linear recurrences, chunkwise, in plain ``jnp``: the ``xla`` path of tx's
recurrent layers and the second reference of ``kernels.gated_linear`` (same algorithm).

The recurrence (``kernels.gated_reference``): ``S_t = a_t S_{t-1} + k_t v_t^T``,
``o_t = S_t^T q_t`` with ``a_t = exp(g_t)``, ``g = log_decay <= 0`` per head or per key
channel. Cut T into chunks of C and let ``G_t = g_1 + ... + g_t`` from the chunk's start
(non-increasing, so every exponent below is <= 0 and nothing overflows):

    o_t = sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s  v_s   +   (q_t * exp(G_t))^T S_0
    S_C = exp(G_C) * S_0 + sum_s (k_s * exp(G_C - G_s)) v_s^T

the first term the masked quadratic form inside the chunk (a ``[C, C, Dk]`` decay tensor when
the decay is per channel), the second the state ``S_0`` the chunk starts from. Documents
(``segment_ids``, contiguous runs) mask the quadratic form, and a chunk uses / carries the
state only within the document it belongs to.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from tx.kernels.common import round_up
from tx.kernels.gated_checks import DEFAULT_CHUNK, check_chunk, check_gated, mask_invalid

__all__ = ["gated_chunked", "chunk_layout"]


def chunk_layout(b, t, c, segment_ids):
    """Per chunk: ``mask [B, nc, C, C]`` (causal and same document), ``seg [B, nc, C]``,
    ``last`` (the document a chunk's state holds), ``prev`` (the one it starts from) and
    ``cont [nc, B]`` (1.0 where the state carries over into the chunk)."""
    t_pad = round_up(t, c)
    nc = t_pad // c
    causal = jnp.tril(jnp.ones((c, c), bool))
    if segment_ids is None:
        seg = jnp.zeros((b, nc, c), jnp.int32)
    else:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)),
                      mode="edge").reshape(b, nc, c)
    mask = causal[None, None] & (seg[..., :, None] == seg[..., None, :])
    last = seg[:, :, -1]
    # The first chunk starts from the initial state, which belongs to the first document.
    prev = jnp.concatenate([seg[:, :1, 0], last[:, :-1]], axis=1)          # [B, nc]
    cont = (prev == last).T.astype(jnp.float32)                            # [nc, B]
    return mask, seg, last, prev, cont


def _chunks(x, c):
    """``[B, T, ...] -> [B, nc, C, ...]`` (zero padded)."""
    b, t = x.shape[:2]
    x = jnp.pad(x, ((0, 0), (0, round_up(t, c) - t)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(b, -1, c, *x.shape[2:])


def decay_scores(q, k, gq, gk, mask, hp):
    """``A[t, s] = sum_d q_td k_sd exp(Gq_td - Gk_sd)`` where ``mask``, else 0.

    q ``[..., C, K, G, Dk]``, k ``[..., C, K, Dk]``, gq ``[..., C, K, 1|Dk]``, gk like gq, mask
    ``[..., C, C]`` -> ``[..., K, G, C, C]``."""
    diff = gq[..., :, None, :, :] - gk[..., None, :, :, :]                 # [...,C,C,K,Dg]
    m = mask[..., None, None]
    e = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
    if diff.shape[-1] == 1:
        return jnp.einsum("...CKGD,...SKD->...KGCS", q, k, precision=hp) * \
            jnp.moveaxis(e[..., 0], -1, -3)[..., None, :, :]
    return jnp.einsum("...CKGD,...SKD,...CSKD->...KGCS", q, k, e, precision=hp)


def gated_chunked(q, k, v, log_decay, *, chunk: int = DEFAULT_CHUNK, segment_ids=None,
                  kv_lengths=None, initial_state=None, final_state: bool = False):
    """Same result as ``gated_reference.gated_recurrence``, chunk by chunk, differentiated by
    JAX. Any ``chunk >= 1`` (T is padded to a multiple). Output in v's dtype; the final state
    (``final_state=True``) ``[B, K, Dk, Dv]`` in fp32. ``log_decay=None`` is the special case
    ``a_t = 1`` (linear attention, ``kernels.linear_chunked``): the decay factors, all 1, are
    left out rather than computed."""
    b, t, n, kh, dk, dv, _ = check_gated(q, k, v, log_decay, segment_ids=segment_ids,
                                         kv_lengths=kv_lengths, chunk=chunk,
                                         allow_no_decay=True)
    check_chunk(chunk, allow_none=False)
    k, v, log_decay, _ = mask_invalid(k, v, log_decay, kv_lengths)
    grp, c, f32, hp = n // kh, min(chunk, t), jnp.float32, lax.Precision.HIGHEST
    mask, seg, last, prev, cont = chunk_layout(b, t, c, segment_ids)
    qc = _chunks(q.astype(f32).reshape(b, t, kh, grp, dk), c)               # [B,nc,C,K,G,Dk]
    kc, vc = _chunks(k.astype(f32), c), _chunks(v.astype(f32), c)           # [B,nc,C,K,D]
    if log_decay is None:
        # Inside each chunk: the masked quadratic form.
        a = jnp.where(mask[:, :, None, None],
                      jnp.einsum("BNCKGD,BNSKD->BNKGCS", qc, kc, precision=hp), 0.0)
        own_k, q_start = kc, qc
        decay = jnp.ones((seg.shape[1], b, 1, 1), f32)                     # [nc,B,1,1]
    else:
        g = log_decay.astype(f32)
        g = g[..., None] if g.ndim == 3 else g                              # [B,T,K,Dg]
        gc = jnp.cumsum(_chunks(g, c), axis=2)                              # [B,nc,C,K,Dg]
        g_last = gc[:, :, -1]                                               # [B,nc,K,Dg]
        a = decay_scores(qc, kc, gc, gc, mask, hp)                          # [B,nc,K,G,C,C]
        own_k = kc * jnp.exp(g_last[:, :, None] - gc)
        q_start = qc * jnp.exp(gc)[:, :, :, :, None]
        decay = jnp.moveaxis(jnp.exp(g_last), 1, 0)                         # [nc,B,K,Dg]
    out = jnp.einsum("BNKGCS,BNSKH->BNCKGH", a, vc, precision=hp)
    # Each chunk's own contribution to its end state: keys of its last document.
    own_k = jnp.where((seg == last[..., None])[..., None, None], own_k, 0.0)
    own = jnp.einsum("BNSKD,BNSKH->BNKDH", own_k, vc, precision=hp)         # [B,nc,K,Dk,Dv]

    def step(state, x):
        own_c, decay_c, cont_c = x
        return cont_c[:, None, None, None] * decay_c[..., None] * state + own_c, state

    s0 = jnp.zeros((b, kh, dk, dv), f32) if initial_state is None else \
        initial_state.astype(f32)
    s_end, start = lax.scan(step, s0, (jnp.moveaxis(own, 1, 0), decay, cont))
    inter = jnp.einsum("BNCKGD,NBKDH->BNCKGH", q_start, start, precision=hp)
    use = (seg == prev[..., None])[..., None, None, None]                   # same document
    out = out + jnp.where(use, inter, 0.0)
    out = out.reshape(b, -1, n, dv)[:, :t].astype(v.dtype)
    return (out, s_end) if final_state else out
