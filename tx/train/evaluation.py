"""Evaluation: the loop's eval split (:func:`evaluate_params`), a run directory's checkpoint
(:func:`evaluate`, parameters only), and any model over given batches
(:func:`evaluate_batches`)."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
from flax import nnx

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
             step: int | None = None, batches: int | None = None) -> dict[str, float]:
    """Evaluates the latest checkpoint (or ``step``) of ``workdir``, reading its parameters
    only; ``config=None`` uses the config saved with the run (on one device when its mesh does
    not fit the devices here)."""
    resolved = configs_lib.resolve(workdir_lib.saved_config(workdir) if config is None
                                   else config)
    model, step = workdir_lib.load_model(resolved, workdir, step=step)
    if step is None:
        raise ConfigError(f"workdir={str(workdir)!r} holds no complete checkpoint.")
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
