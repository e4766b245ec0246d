"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, gradient
accumulation (``optax.MultiSteps``) and a non-finite guard (:func:`skip_nonfinite`).

The guard skips an update when the gradients, the update itself, the new parameters or the
new optimizer state hold a NaN or Inf, and counts it; the training loop reads
:func:`nonfinite_count` and stops after ``train.max_nonfinite`` in a row. (``optax``'s
``apply_if_finite`` checks the gradients only: a huge learning rate turns finite gradients
into non-finite parameters behind its back.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

AUTO_WARMUP = -1  # ``train.warmup_steps``'s default
MAX_AUTO_WARMUP = 20


def warmup_steps(train) -> int:
    """``train.warmup_steps``, or for :data:`AUTO_WARMUP` ``min(20, length // 10)`` of the
    schedule's length (``train.schedule_steps``, the saved run's on resume, so a resumed or
    extended run warms up as it started; else ``train.steps``)."""
    if train.warmup_steps != AUTO_WARMUP:
        return train.warmup_steps
    return min(MAX_AUTO_WARMUP, (train.schedule_steps or train.steps) // 10)


def schedule(train) -> optax.Schedule:
    """Learning rate per optimizer update, over ``train.schedule_steps`` (set from
    ``train.steps`` when a run starts, and kept when a resumed run is extended)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup_steps(train),
        decay_steps=train.schedule_steps or train.steps,
        end_value=train.learning_rate * train.min_learning_rate_ratio)


def make_optimizer(train) -> optax.GradientTransformation:
    """One call per micro-batch; the parameters change every ``train.grad_accum`` calls."""
    parts = [optax.clip_by_global_norm(train.clip_norm)] if train.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(train), b1=train.b1, b2=train.b2,
                             weight_decay=train.weight_decay))
    inner = optax.chain(*parts)
    if train.grad_accum > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=train.grad_accum)
    return skip_nonfinite(inner)


class GuardState(NamedTuple):
    """The fields (and their order) of ``optax.ApplyIfFiniteState``, so checkpoints written
    under that guard still restore."""

    notfinite_count: jax.Array  # skipped in a row
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, but an update that would leave anything non-finite is replaced by zeros and
    the inner state is kept as it was."""

    def init(params):
        # Distinct buffers: the train step donates every leaf of its state.
        return GuardState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.bool_),
                          jnp.zeros([], jnp.int32), inner.init(params))

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner_state, params)
        ok = _all_finite(grads) & _all_finite(updates) & _all_finite(inner_state)
        if params is not None:
            ok &= _all_finite(optax.apply_updates(params, updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        return updates, GuardState(
            notfinite_count=jnp.where(ok, 0, state.notfinite_count + 1), last_finite=ok,
            total_notfinite=state.total_notfinite + bad,
            inner_state=keep(inner_state, state.inner_state))

    return optax.GradientTransformation(init, update)


def nonfinite_count(opt_state):
    """Consecutive skipped (non-finite) micro-batches so far."""
    return opt_state.notfinite_count


def total_nonfinite(opt_state):
    return opt_state.total_notfinite
