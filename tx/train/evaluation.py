"""Evaluation: the loop's eval split (:func:`evaluate_params`), a run directory's checkpoint
(:func:`evaluate`, parameters only), and any model over given batches
(:func:`evaluate_batches`)."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from flax import nnx

from tx.attention import memory as memory_lib
from tx.train.losses import loss_fn

from tx.train import configs as configs_lib
from tx.train import workdir as workdir_lib
from tx.train.configs import ConfigError
from tx.train.step import make_eval_step


def evaluate_params(eval_step, params, rest, eval_ds, batches: int) -> dict[str, float]:
    """Loss and accuracy summed over the first ``batches`` eval batches (a fixed set)."""
    sums = [eval_step(params, rest, eval_ds.batch(i)) for i in range(batches)]
    total = {k: float(sum(m[k] for m in sums)) for k in ("loss_sum", "correct", "count")}
    count = max(total["count"], 1.0)
    return {"eval_loss": total["loss_sum"] / count, "eval_accuracy": total["correct"] / count}


def accuracy_name(dataset) -> str:
    """What a dataset's accuracy measures, for people: ``recall`` on MQAR (the share of
    queried values recalled), ``accuracy`` by default."""
    return getattr(dataset, "accuracy_name", "accuracy")


def evaluate(config: ml_collections.ConfigDict | None, workdir: str | pathlib.Path, *,
             step: int | None = None, batches: int | None = None,
             memory_length: int | None = None) -> dict[str, float]:
    """Evaluates the latest checkpoint (or ``step``) of ``workdir``, reading its parameters
    only; ``config=None`` uses the config saved with the run (on one device when its mesh does
    not fit the devices here). ``memory_length``: a Transformer-XL model reads the eval
    batches as consecutive segments with a memory of that many rows, which may exceed the
    training segment (:func:`evaluate_with_memory`; the eval data must be contiguous)."""
    resolved = configs_lib.resolve(workdir_lib.saved_config(workdir) if config is None
                                   else config)
    model, step = workdir_lib.load_model(resolved, workdir, step=step)
    if step is None:
        raise ConfigError(f"workdir={str(workdir)!r} holds no complete checkpoint.")
    if memory_length:
        _, eval_ds = configs_lib.make_datasets(resolved)
        out = evaluate_with_memory(model, eval_ds, memory_length=memory_length,
                                   batches=batches or resolved.train.eval_batches)
        return {"step": step, "eval_loss": out["loss"], "eval_accuracy": out["accuracy"],
                "memory_length": memory_length}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    parallel = workdir_lib.make_parallel(resolved)
    eval_step = make_eval_step(graphdef, parallel=parallel,
                               shardings=parallel.shardings((params, rest)))
    _, eval_ds = configs_lib.make_datasets(resolved)
    out = evaluate_params(eval_step, params, rest, eval_ds,
                          batches or resolved.train.eval_batches)
    return {"step": step, **out}


def evaluate_batches(model: nnx.Module, batches) -> dict[str, float]:
    """Token loss of ``model`` over ``batches`` (an iterable of batch dicts, e.g. packed rows
    from :func:`tx.data.packing.packed_batches`: segment ids keep documents apart and only
    weighted tokens count): ``loss`` (per token), ``perplexity`` (``exp(loss)``), ``accuracy``
    and ``tokens`` (the count scored)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef)
    total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in batches:
        metrics = eval_step(params, rest, batch)
        for key in total:
            total[key] += float(metrics[key])
    if not total["count"]:
        raise ValueError("the batches hold no weighted tokens to score; give some text.")
    loss = total["loss_sum"] / total["count"]
    return {"loss": loss, "perplexity": float(np.exp(loss)),
            "accuracy": total["correct"] / total["count"], "tokens": int(total["count"])}


def evaluate_with_memory(model: nnx.Module, dataset, *, memory_length: int,
                         batches: int) -> dict[str, float]:
    """Token loss of a recurrent (Transformer-XL) ``model`` over the first ``batches``
    batches of a contiguous ``dataset`` (row ``b`` of batch ``i + 1`` continues row ``b`` of
    batch ``i``), each layer carrying a memory of ``memory_length`` rows from batch to batch.
    The paper evaluates with a memory longer than the training segment: any length works, as
    positions are relative. Returns ``loss``, ``perplexity``, ``accuracy``, ``tokens`` and
    ``memory_length``; ``model`` keeps the final memory."""
    if not getattr(dataset, "contiguous", False):
        raise ValueError(f"dataset={type(dataset).__name__}: evaluating with a memory needs "
                         "contiguous rows (tx.data.ByteLM(..., contiguous=True)).")
    if isinstance(memory_length, bool) or not isinstance(memory_length, int) or \
            memory_length < 1:
        raise ValueError(f"memory_length={memory_length!r}: give the positive number of rows "
                         "each layer remembers, e.g. twice the segment length.")
    memory_lib.init_memory(model, dataset.batch_size, memory_length)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, batch):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.eval()
        _, metrics = loss_fn(m, batch)
        return metrics, nnx.split(m, nnx.Param, ...)[2]

    total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for i in range(batches):
        metrics, rest = step(params, rest, dataset.batch(i))
        for key in total:
            total[key] += float(metrics[key])
    nnx.update(model, rest)
    loss = total["loss_sum"] / max(total["count"], 1.0)
    return {"loss": loss, "perplexity": float(np.exp(loss)),
            "accuracy": total["correct"] / max(total["count"], 1.0),
            "tokens": int(total["count"]), "memory_length": memory_length}
