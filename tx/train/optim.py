"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, gradient
accumulation (``optax.MultiSteps``) and a non-finite guard (``optax.apply_if_finite``).

The guard skips an update whose gradients hold a NaN or Inf and counts it; the training loop
reads :func:`nonfinite_count` and stops after ``train.max_nonfinite`` in a row.
"""

from __future__ import annotations

import optax

# apply_if_finite applies updates again after this many failures; the loop stops long before.
_NEVER = 2**30


def schedule(train) -> optax.Schedule:
    """Learning rate per optimizer update."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=train.steps, end_value=train.learning_rate * train.min_learning_rate_ratio)


def make_optimizer(train) -> optax.GradientTransformation:
    """One call per micro-batch; the parameters change every ``train.grad_accum`` calls."""
    parts = [optax.clip_by_global_norm(train.clip_norm)] if train.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(train), b1=train.b1, b2=train.b2,
                             weight_decay=train.weight_decay))
    inner = optax.chain(*parts)
    if train.grad_accum > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=train.grad_accum)
    return optax.apply_if_finite(inner, max_consecutive_errors=_NEVER)


def nonfinite_count(opt_state):
    """Consecutive skipped (non-finite) micro-batches so far."""
    return opt_state.notfinite_count


def total_nonfinite(opt_state):
    return opt_state.total_notfinite
