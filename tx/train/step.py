"""The hot training step: a pure function over ``nnx.split`` state under ``jax.jit``.

``nnx.jit`` costs milliseconds of Python per step on small models; splitting once and jitting a
pure function over (params, rest, opt_state) with donated buffers does not.

With a :class:`tx.parallel.Parallel` the step is compiled with explicit in/out shardings from
the parameters' logical axis names (``tx.parallel.RULES``), batches are split over
``(data, fsdp)``, and the mesh is active while the step is traced (activation constraints,
kernels run per shard).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx

from tx import parallel as parallel_lib
from tx.parallel.context import check_model as check_context
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

    def arrays(self) -> tuple[Any, Any, Any]:
        return self.params, self.rest, self.opt_state


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState(graphdef, params, rest, optimizer.init(params))


def create_state(build: Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                 parallel: parallel_lib.Parallel) -> TrainState:
    """:func:`init_state`, then every array moved into its sharding on ``parallel``'s mesh.

    Initialisation runs eagerly on the first device of each host (its small ops are compiled
    once per process, where a jitted initialiser would compile once per model and mesh); the
    state is then split, each process placing only the shards its devices hold."""
    state = init_state(build(), optimizer)
    if parallel.size > 1:
        state.params, state.rest, state.opt_state = parallel_lib.put(
            state.arrays(), state_shardings(state, parallel))
    return state


def state_shardings(state: TrainState, parallel: parallel_lib.Parallel) -> tuple:
    """(params, rest, opt_state) shardings by the logical names of the state's Variables."""
    return parallel.shardings(state.arrays())


def _placing(jitted: Callable, parallel: parallel_lib.Parallel | None) -> Callable:
    """Splits the host batch (the last argument) over ``(data, fsdp)`` before the step."""
    if parallel is None:
        return jitted

    def call(*args):
        *state, batch = args
        return jitted(*state, parallel_lib.put_batch(parallel, batch))
    return call


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *,
                    parallel: parallel_lib.Parallel | None = None,
                    shardings: tuple | None = None) -> Callable:
    """``step(params, rest, opt_state, batch) -> (params, rest, opt_state, metrics)``;
    ``metrics``: the head's sums (``loss_sum``, ``correct``, ``count``), ``loss`` (their
    mean: the loss the update descends), ``grad_norm``, and ``nonfinite`` with
    :func:`tx.train.optim.skip_nonfinite`.

    With a ``parallel`` of several devices, ``shardings`` are the (params, rest, opt_state)
    shardings (:func:`state_shardings`); the step keeps the state in them and takes host
    batches. A one-device mesh compiles exactly the single-device step."""

    def step(params, rest, opt_state, batch):
        with parallel_lib.use(parallel):
            def loss(p, r):
                model = nnx.merge(graphdef, p, r, copy=True)
                check_context(model, parallel)  # layers a split sequence cannot run
                model.train()
                value, metrics = loss_fn(model, batch)
                return value, (metrics, nnx.split(model, nnx.Param, ...)[2])

            (value, (metrics, new_rest)), grads = jax.value_and_grad(loss, has_aux=True)(
                params, rest)
            metrics["loss"] = value  # the mean loss the gradient is of (loss_sum / count)
            metrics["grad_norm"] = optax.tree.norm(grads)
            # Optax mixes Python floats with int32 step counts (bias correction); the model
            # above runs under whatever promotion the caller set (strict in the tests).
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(grads, opt_state, params)
            if hasattr(opt_state, "notfinite_count"):  # tx.train.optim.skip_nonfinite
                metrics["nonfinite"] = opt_state.notfinite_count
            return optax.apply_updates(params, updates), new_rest, opt_state, metrics

    if parallel is None or parallel.size == 1:
        return jax.jit(step, donate_argnums=(0, 1, 2))
    jitted = jax.jit(step, donate_argnums=(0, 1, 2),
                     in_shardings=(*shardings, parallel.rows()),
                     out_shardings=(*shardings, parallel.replicated()))
    return _placing(jitted, parallel)


def make_eval_step(graphdef, *, parallel: parallel_lib.Parallel | None = None,
                   shardings: tuple | None = None) -> Callable:
    """``eval_step(params, rest, batch) -> metrics`` (the head's sums and their mean
    ``loss``) with dropout off."""

    def step(params, rest, batch):
        with parallel_lib.use(parallel):
            model = nnx.merge(graphdef, params, rest, copy=True)
            check_context(model, parallel)
            model.eval()
            value, metrics = loss_fn(model, batch)
            return {**metrics, "loss": value}

    if parallel is None or parallel.size == 1:
        return jax.jit(step)
    jitted = jax.jit(step, in_shardings=(*shardings[:2], parallel.rows()),
                     out_shardings=parallel.replicated())
    return _placing(jitted, parallel)
