"""Causal linear attention, chunkwise, in plain ``jnp``: the ``xla`` path of tx's linear
layers and the second reference of ``kernels.linear_attention`` (same algorithm, see there).

It is the decay-gated recurrence of ``kernels.gated_chunked`` with no decay (``a_t = 1``, log
decay 0): ``S_t = S_{t-1} + k_t v_t^T`` over the features ``k_f``, read by ``q_f``. The
normaliser ``sum_s q_f[t] . k_f[s]`` rides along as an extra value column of ones
(``[v, 1]``), so one recurrence over ``[B, T, K, H + 1]`` gives numerator and denominator;
chunking, packing resets and key lengths are ``gated_chunked``'s (one code path for both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tx.kernels.gated_chunked import gated_chunked
from tx.kernels.linear_checks import DEFAULT_CHUNK, check_arguments

__all__ = ["linear_attention_chunked"]


def linear_attention_chunked(q_f: jax.Array, k_f: jax.Array, v: jax.Array, *, chunk: int,
                             segment_ids: jax.Array | None = None,
                             kv_lengths: jax.Array | None = None,
                             eps: float = 0.0, initial_state: tuple | None = None,
                             final_state: bool = False):
    """``out[t] = sum_s A[t, s] v[s] / (sum_s A[t, s] + eps)``, ``A = q_f k_f^T`` over the
    visible keys, chunk by chunk (fp32), differentiated by JAX; zeros (and zero gradients)
    where the denominator is 0. Any ``chunk >= 1``; T is padded to a multiple of it. Output in
    v's dtype.

    ``initial_state``: ``(S [B, K, F, H], z [B, K, F])`` of earlier tokens (decoding), which the
    first document continues; ``final_state=True`` also returns that pair after the last
    token, in fp32: ``(out, (S, z))``."""
    b, t, _, _, kh, f, h = check_arguments(q_f, k_f, v, segment_ids=segment_ids,
                                           kv_lengths=kv_lengths, chunk=chunk, eps=eps,
                                           limits=False)
    if chunk is None:
        raise ValueError("chunk=None must be an int >= 1 for linear_attention_chunked; use "
                         f"e.g. chunk={DEFAULT_CHUNK}.")
    f32 = jnp.float32
    state = None
    if initial_state is not None:
        s_bkfh, z_bkf = initial_state
        if tuple(s_bkfh.shape) != (b, kh, f, h) or tuple(z_bkf.shape) != (b, kh, f):
            raise ValueError(f"initial_state shapes {tuple(s_bkfh.shape)}, "
                             f"{tuple(z_bkf.shape)} must be (S [B, K, F, H], z [B, K, F]) = "
                             f"({(b, kh, f, h)}, {(b, kh, f)}); pass the state of the same "
                             "heads and features.")
        state = jnp.concatenate([s_bkfh.astype(f32), z_bkf.astype(f32)[..., None]], axis=-1)
    # fp32 throughout (the numerator and denominator are divided after the recurrence).
    v_aug = jnp.concatenate([v.astype(f32), jnp.ones((b, t, kh, 1), f32)], axis=-1)
    nd = gated_chunked(q_f.astype(f32), k_f.astype(f32), v_aug, None, chunk=chunk,  # a_t = 1
                       segment_ids=segment_ids, kv_lengths=kv_lengths, initial_state=state,
                       final_state=final_state)                             # [B,T,N,H+1]
    if final_state:
        nd, state = nd
    d = nd[..., h] + eps
    good = d != 0.0
    out = jnp.where(good[..., None], nd[..., :h] / jnp.where(good, d, 1.0)[..., None], 0.0)
    out = out.astype(v.dtype)
    return (out, (state[..., :h], state[..., h])) if final_state else out
