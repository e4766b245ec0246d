"""Causal linear attention, chunkwise, in plain ``jnp``: the ``xla`` path of tx's linear
layers and the second reference of ``kernels.linear_attention`` (same algorithm, see there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from tx.kernels.common import round_up
from tx.kernels.linear_checks import DEFAULT_CHUNK, check_arguments

__all__ = ["linear_attention_chunked"]


def linear_attention_chunked(q_f: jax.Array, k_f: jax.Array, v: jax.Array, *, chunk: int,
                             segment_ids: jax.Array | None = None,
                             kv_lengths: jax.Array | None = None,
                             eps: float = 0.0) -> jax.Array:
    """The same chunkwise algorithm in plain ``jnp`` (fp32), differentiated by JAX.

    The work is batched over chunks: the masked quadratic form of every chunk and every
    chunk's own state contribution are single einsums; a ``lax.scan`` over chunks then carries
    the state (reset at document boundaries) and hands each chunk the state it starts from.
    The normaliser rides along as an extra value column of ones (``[v, 1]``), so the state is
    ``[B, K, F, H + 1]`` and one contraction gives numerator and denominator. Any
    ``chunk >= 1``; T is padded to a multiple of it. Output in v's dtype.
    """
    b, t, _, n, kh, f, h = check_arguments(q_f, k_f, v, segment_ids=segment_ids,
                                           kv_lengths=kv_lengths, chunk=chunk, eps=eps,
                                           limits=False)
    if chunk is None:
        raise ValueError("chunk=None must be an int >= 1 for linear_attention_chunked; use "
                         f"e.g. chunk={DEFAULT_CHUNK}.")
    g = n // kh
    c = min(chunk, t)
    t_pad = round_up(t, c)
    nc = t_pad // c
    f32 = jnp.float32

    def chunks(x):  # [B, T, ...] -> [B, nc, C, ...] (zero padded)
        x = jnp.pad(x, ((0, 0), (0, t_pad - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, nc, c, *x.shape[2:])

    lens = jnp.full((b,), t, jnp.int32) if kv_lengths is None else \
        jnp.clip(kv_lengths.astype(jnp.int32), 0, t)
    key_ok = (jnp.arange(t, dtype=jnp.int32)[None, :] < lens[:, None])[:, :, None, None]
    v_aug = jnp.concatenate([v.astype(f32), jnp.ones((b, t, kh, 1), f32)], axis=-1)
    q = chunks(q_f.astype(f32).reshape(b, t, kh, g, f))                     # [B,nc,C,K,G,F]
    k = chunks(jnp.where(key_ok, k_f.astype(f32), 0.0))                     # [B,nc,C,K,F]
    va = chunks(jnp.where(key_ok, v_aug, 0.0))                              # [B,nc,C,K,H+1]
    mask = jnp.tril(jnp.ones((c, c), bool))                                 # [C, C]
    has_segments = segment_ids is not None
    if has_segments:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), mode="edge")
        seg = seg.reshape(b, nc, c)
        mask = mask[None, None] & (seg[..., :, None] == seg[..., None, :])  # [B,nc,C,C]
        last = seg[:, :, -1]                                                # [B, nc]
        # A chunk's own contribution to the state: keys of its last document.
        k_own = jnp.where((seg == last[..., None])[..., None, None], k, 0.0)
    else:
        mask, k_own = jnp.broadcast_to(mask, (b, nc, c, c)), k
    # Inside each chunk: the masked quadratic form.
    a = jnp.where(mask[:, :, None, None], jnp.einsum("BNCKGF,BNDKF->BNKGCD", q, k), 0.0)
    nd = jnp.einsum("BNKGCD,BNDKH->BNCKGH", a, va)                          # [B,nc,C,K,G,H+1]
    own = jnp.einsum("BNDKF,BNDKH->BNKFH", k_own, va)                       # [B,nc,K,F,H+1]

    # Between chunks: the state each chunk starts from (zero when its document starts here).
    def step(state, x):
        own_c, cont = x                                 # [B,K,F,H+1], [B] (1: same document)
        return cont[:, None, None, None] * state + own_c, state

    cont = jnp.ones((nc, b), f32) if not has_segments else \
        jnp.concatenate([jnp.zeros((1, b), f32),
                         (last[:, 1:] == last[:, :-1]).T.astype(f32)])      # [nc, B]
    _, start = lax.scan(step, jnp.zeros((b, kh, f, h + 1), f32),
                        (jnp.moveaxis(own, 1, 0), cont))                    # [nc,B,K,F,H+1]
    inter = jnp.einsum("BNCKGF,NBKFH->BNCKGH", q, start)
    if has_segments:  # rows of another document than the carried state's
        prev = jnp.concatenate([last[:, :1], last[:, :-1]], axis=1)        # [B, nc]
        inter = jnp.where((seg == prev[..., None])[..., None, None, None], inter, 0.0)
    nd = nd + inter
    d = nd[..., h] + eps
    good = d != 0.0
    out = jnp.where(good[..., None], nd[..., :h] / jnp.where(good, d, 1.0)[..., None], 0.0)
    return out.reshape(b, t_pad, n, h)[:, :t].astype(v.dtype)
