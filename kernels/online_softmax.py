"""The pieces every attention kernel here shares: fp32-accumulating dots and one step of the
online (streaming) softmax over a tile of keys, in base 2 as FlashAttention-2 computes it."""

import math

import jax.numpy as jnp
from jax import lax

# Logits are scaled by ``LOG2E`` so the softmax runs in base 2: exp(x) = exp2(x * log2(e)).
LOG2E = math.log2(math.e)


def dot(a, b, contract, precision):
    """``a @ b`` contracting ``contract = (dim_a, dim_b)``, fp32 accumulation."""
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def precision(dtype):
    # fp32 inputs get true fp32 dots (IEEE in Triton, not TF32) to match the reference.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def update(m_prev, l_prev, acc, s, v, dot_precision):
    """Folds one key tile into the running max ``m``, sum ``l`` and output ``acc``.

    ``s`` is ``[rows, block_k]`` base-2 logits (``-inf`` where hidden), ``v`` the tile's
    ``[block_k, H]`` values. Rows that have seen nothing yet keep ``m = -inf`` without NaN.
    """
    m_next = jnp.maximum(m_prev, s.max(axis=1))                            # [rows]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])                                      # [rows, block_k]
    l_next = alpha * l_prev + p.sum(axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, (1, 0), dot_precision)
    return m_next, l_next, acc
