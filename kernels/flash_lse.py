"""Flash attention that also returns each row's log-sum-exp, differentiable in both.

``flash_attention(..., return_lse=True)`` lands here. A caller that merges partial results
(ring attention: ``O = sum_p exp(lse_p - L) o_p``) needs the lse of every block and its
gradient. The forward kernel stores the lse anyway (base 2, for the backward pass); the
backward kernels take a cotangent ``g`` for it as a change of the softmax row term: since
``d lse_i / d s_ij = p_ij``, ``ds_ij = p_ij (dp_ij - delta_i) + g_i p_ij``, i.e. ``delta``
becomes ``delta - g``. Nothing else in the kernels changes.

Reference: ``jax.nn.logsumexp`` of the masked, scaled logits (see tests/kernels).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from tx.kernels.online_softmax import LOG2E

# The module, not the op that ``tx.kernels`` exports under the same name.
flash = importlib.import_module("tx.kernels.flash_attention")

NEG = -1e30  # the lse of a row that sees no key (the kernel stores +inf: merges need finite)


def _unfold(cfg, lse_f):
    """``[B, N/fold, T_pad*fold]`` base-2 -> ``[B, T, N]`` natural (``NEG`` where unseen)."""
    b, hg, _ = lse_f.shape
    x = lse_f.reshape(b, hg, cfg.q_pad, cfg.fold).transpose(0, 2, 1, 3)
    x = x.reshape(b, cfg.q_pad, hg * cfg.fold)[:, :cfg.q_len]
    return jnp.where(jnp.isinf(x), NEG, x / LOG2E)


def _fold(cfg, x_btn):
    """``[B, T, N]`` -> the kernel's row layout ``[B, N/fold, T_pad*fold]`` (zero padding)."""
    b, t, n = x_btn.shape
    x = jnp.pad(x_btn.astype(jnp.float32), ((0, 0), (0, cfg.q_pad - t), (0, 0)))
    x = x.reshape(b, cfg.q_pad, n // cfg.fold, cfg.fold).transpose(0, 2, 1, 3)
    return x.reshape(b, n // cfg.fold, cfg.q_pad * cfg.fold)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _with_lse(cfg, q, k, v, segment_ids, kv_lengths, params, sinks, tables):
    return _fwd(cfg, q, k, v, segment_ids, kv_lengths, params, sinks, tables)[0]


def _fwd(cfg, *args):
    out, residuals = flash._flash_fwd(cfg, *args)
    return (out, _unfold(cfg, residuals[4])), residuals


def _bwd(cfg, residuals, cotangents):
    do, d_lse = cotangents
    return flash._flash_bwd(cfg, residuals, do, d_lse=_fold(cfg, d_lse))


_with_lse.defvjp(_fwd, _bwd)

with_lse = jax.jit(_with_lse, static_argnums=(0,))
