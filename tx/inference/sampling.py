"""Token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

A strategy is a small frozen value (hashable, so ``jit`` specialises on it), applied to fp32
logits ``[B, V]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token."""

    def __call__(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Ancestral sampling at ``temperature``, optionally from the ``top_k`` most likely tokens
    and/or the smallest set whose probability reaches ``top_p``."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; use Greedy() for "
                             "temperature 0.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or None for no cut).")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (or None for no cut).")

    def __call__(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
        logits = filter_logits(logits_bv.astype(jnp.float32) / self.temperature,
                               top_k=self.top_k, top_p=self.top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def filter_logits(logits_bv: jax.Array, *, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """Sets the logits of tokens outside the top-k / top-p set to -inf."""
    neg_inf = jnp.finfo(logits_bv.dtype).min
    if top_k is not None and top_k < logits_bv.shape[-1]:
        kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
        logits_bv = jnp.where(logits_bv < kth, neg_inf, logits_bv)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits_bv, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass *before* it is below top_p: the first always survives.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff, neg_inf, logits_bv)
    return logits_bv
