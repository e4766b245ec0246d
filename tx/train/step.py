"""The hot training step: a pure function over ``nnx.split`` state under ``jax.jit``.

``nnx.jit`` costs milliseconds of Python per step on small models; splitting once and jitting a
pure function over (params, rest, opt_state) with donated buffers does not.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx

from tx.train.losses import loss_fn


@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree of arrays plus the static graph."""

    graphdef: Any
    params: Any  # nnx.State of nnx.Param
    rest: Any  # everything else (dropout RNG counters, ...)
    opt_state: Any
    step: int = 0

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState(graphdef, params, rest, optimizer.init(params))


def make_train_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
    """``step(params, rest, opt_state, batch) -> (params, rest, opt_state, metrics)``."""

    def step(params, rest, opt_state, batch):
        def loss(p, r):
            model = nnx.merge(graphdef, p, r, copy=True)
            model.train()
            value, metrics = loss_fn(model, batch)
            return value, (metrics, nnx.split(model, nnx.Param, ...)[2])

        (_, (metrics, new_rest)), grads = jax.value_and_grad(loss, has_aux=True)(params, rest)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if hasattr(opt_state, "notfinite_count"):  # optax.apply_if_finite's guard
            metrics["nonfinite"] = opt_state.notfinite_count
        return optax.apply_updates(params, updates), new_rest, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(graphdef) -> Callable:
    """``eval_step(params, rest, batch) -> metrics`` with dropout off."""

    def step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        return loss_fn(model, batch)[1]

    return jax.jit(step)
