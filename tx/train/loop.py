"""The training loop: ``run(config, workdir)`` trains, evaluates, checkpoints and resumes.

Rerunning the same config on the same workdir resumes from the latest complete checkpoint
(params, optimizer state, RNG, step = data position) and reproduces the uninterrupted run's
per-step losses exactly. A config that differs from the checkpoint's in a field that changes
the trajectory fails with a diff of those fields.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tx.attention import registry
from tx import models
from tx.inference import memory
from tx.layers.block import Block
from tx import parallel as parallel_lib
from tx.train import configs as configs_lib
from tx.train.checkpoint import (CheckpointError, Checkpointer, background_errors_to,
                                 disk_full, is_disk_full)
from tx.train import init as init_lib
from tx.train.lock import WorkdirLock
from tx.train.preemption import Preempted, StopSignals, agree
from tx.train.configs import ConfigError, Resolved
from tx.train.metrics import MetricsLog, Progress
from tx.train.optim import make_optimizer, schedule, warmup_steps
from tx.train.step import create_state, make_eval_step, make_train_step, state_shardings


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row."""


# -------------------------------------------------------------------------------- the model


class Remat(nnx.Module):
    """Wraps a block so its activations are recomputed in the backward pass."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return nnx.remat(lambda block, a, k: block(*a, **k))(self.inner, args, kwargs)


def _remat_blocks(model: nnx.Module) -> None:
    """Wraps every ``Block`` in place; the model is walked with ``nnx.iter_graph``, and
    towers find their attention layers the same way, through the wrapper."""
    for _, towers in list(nnx.iter_graph(model)):
        if isinstance(towers, models.Tower):
            for i, block in enumerate(towers.blocks):
                if isinstance(block, Block):
                    towers.blocks[i] = Remat(block)


def build_model(resolved: Resolved) -> nnx.Module:
    model = models.build(resolved.model, seed=resolved.train.seed)
    if resolved.train.remat:
        _remat_blocks(model)
    return model


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def kv_bytes_per_token(cfg) -> int:
    """Self-attention K and V cache bytes one decoded token costs (0 for encoders), in an
    unbounded cache: linear layers (FAVOR+) keep a constant-size state and add nothing
    (``tx.inference.kv_cache_bytes`` gives whole caches, rolling windows included)."""
    if not getattr(cfg.head, "generates", False):
        return 0
    softmax = [m for m in memory.decoding_masks(cfg) if not hasattr(m, "state_bytes")]
    return 2 * len(softmax) * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


# ----------------------------------------------------------------------------- evaluation


def evaluate_params(eval_step, params, rest, eval_ds, batches: int) -> dict[str, float]:
    """Loss and accuracy summed over the first ``batches`` eval batches (a fixed set)."""
    sums = [eval_step(params, rest, eval_ds.batch(i)) for i in range(batches)]
    total = {k: float(sum(m[k] for m in sums)) for k in ("loss_sum", "correct", "count")}
    count = max(total["count"], 1.0)
    return {"eval_loss": total["loss_sum"] / count, "eval_accuracy": total["correct"] / count}


# -------------------------------------------------------------------------------- resuming


def _check_compatible(saved: dict, current: ml_collections.ConfigDict, workdir, step) -> None:
    saved, current = copy.deepcopy(saved), current.to_dict()
    train = saved.setdefault("train", {})
    train.setdefault("schedule_steps", train.get("steps"))  # runs saved before the field
    saved.setdefault("init", copy.deepcopy(configs_lib.INIT))  # ... and before init
    defaults = configs_lib.model_dict().to_dict()
    for key in current.get("model", {}):  # ... and model flags newer than the run
        if key in defaults:
            saved.setdefault("model", {}).setdefault(key, defaults[key])
    if not current.get("train", {}).get("schedule_steps"):  # unset: the saved run's holds
        current.setdefault("train", {})["schedule_steps"] = train["schedule_steps"]
    for section in (train, current["train"]):  # the warm-up each resolves to (-1: auto)
        if "warmup_steps" in section:
            section["warmup_steps"] = warmup_steps(ml_collections.ConfigDict(section))
    lines = configs_lib.diff(saved, current)
    if lines:
        raise ConfigError(
            f"workdir={str(workdir)!r} holds a checkpoint at step {step} made with a different "
            "config (saved -> now):\n" + "\n".join(lines) +
            "\nRevert these fields, or use a new --workdir to start a fresh run.")


def _restore(ckpt: Checkpointer, state, config, workdir, *, report, quarantine: bool,
             step: int | None = None):
    """-> (step, arrays) of the newest checkpoint that verifies (or of ``step``), in the
    shardings of ``state`` (the current mesh); ``(None, None)`` when there is none."""
    template = {"params": state.params, "rest": state.rest, "opt_state": state.opt_state}
    check = lambda meta, s: _check_compatible(meta["config"], config, workdir, s)
    if step is not None:  # an explicit step: its own verdict, no fallback
        check(ckpt.read_meta(step), step)
        return step, ckpt.restore(step, template)[0]
    found = ckpt.restore_good(template, report=report, quarantine=quarantine, check=check)
    return (None, None) if found is None else found[:2]


def _saved_model(workdir) -> dict | None:
    """The model section a run in ``workdir`` saved, when it has checkpoints to resume."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file() or not any(
            p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        return None
    return json.loads((workdir / "config.json").read_text()).get("model")


def _with_schedule(resolved: Resolved, ckpt: Checkpointer, print_fn) -> Resolved:
    """Fills ``train.schedule_steps``: the saved run's when resuming (so extending
    ``train.steps`` keeps the learning-rate curve the run is on), else ``train.steps``."""
    train = resolved.train
    if train.schedule_steps:
        return resolved
    saved = None
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.read_meta(step)["config"]["train"]
            break
        except CheckpointError:
            continue  # restore_good reports it
    length = train.steps if saved is None else saved.get("schedule_steps") or saved["steps"]
    if saved is not None and length != train.steps and print_fn:
        print_fn(f"train.steps={train.steps}: the learning-rate schedule keeps the length this "
                 f"run started with ({length} steps); set config.train.schedule_steps to "
                 "change it (a new trajectory, so a new --workdir).")
    config = copy.deepcopy(resolved.config)
    config.train.schedule_steps = length
    return dataclasses.replace(resolved, config=config)


def make_parallel(resolved: Resolved) -> parallel_lib.Parallel:
    """The config's device mesh (one device by default)."""
    return parallel_lib.Parallel(parallel_lib.make_mesh(resolved.mesh))


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics, plots and prints; checkpoints are collective."""
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------ loop


class _Window:
    """Device metrics of the steps since the last log, fetched together (one host sync)."""

    def __init__(self):
        self.pending, self.start = [], time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> tuple[list[tuple[int, dict]], float]:
        fetched = jax.device_get(self.pending)
        now = time.perf_counter()
        elapsed, self.pending, self.start = now - self.start, [], now
        return fetched, elapsed


def _split(batch: dict, parts: int) -> list[dict]:
    """``parts`` equal micro-batches along the batch axis."""
    if parts == 1:
        return [batch]
    size = len(next(iter(batch.values()))) // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _merge(micro: list[dict]) -> dict:
    out = {k: sum(m[k] for m in micro) for k in ("loss_sum", "correct", "count")}
    out["grad_norm"] = micro[-1]["grad_norm"]
    out["nonfinite"] = micro[-1].get("nonfinite", 0)
    return out


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary:
    ``first_loss`` (step 1's: the starting model's), final ``loss``, ``eval_loss``,
    ``eval_accuracy``, ``tokens_per_second``, ``params``,
    ``kv_bytes_per_token``, ``steps``, ``skipped``, ``wall_seconds``.

    Holds ``workdir``'s lock for the whole run (a second run there fails at once). SIGTERM or
    SIGINT ends the run after the current step with a saved checkpoint and :class:`Preempted`;
    a failed background save raises :class:`CheckpointError` at the next step, and a full disk
    (checkpoints, logs, plots) a :class:`CheckpointError` naming the path it was writing."""
    wall_start = time.perf_counter()
    config = init_lib.with_source_model(config, _saved_model(workdir))
    resolved = configs_lib.resolve(config)
    workdir = configs_lib.check_workdir(workdir)
    if not is_main_process():
        print_fn = None
    train = resolved.train
    with WorkdirLock(workdir, take=is_main_process()), StopSignals() as stop:
        ckpt = Checkpointer(workdir, keep=train.keep, keep_best=train.keep_best,
                            async_save=train.async_checkpoints)
        with background_errors_to(ckpt.error_log):
            try:
                resolved = _with_schedule(resolved, ckpt, print_fn)
                return _train(resolved, workdir, ckpt, print_fn, wall_start, stop)
            except OSError as e:  # metrics, config.json, plots (checkpoints: Checkpointer)
                if is_disk_full(e):
                    raise disk_full(e.filename or workdir) from e
                raise
            finally:
                ckpt.close()


class _Run:
    """The loop's bookkeeping between steps: metrics window, log, non-finite streak."""

    def __init__(self, resolved: Resolved, log: MetricsLog, progress: Progress, start: int):
        self.train, self.log, self.progress = resolved.train, log, progress
        self.tokens_per_step = resolved.train.batch_size * resolved.data.seq_len
        self.lr = schedule(resolved.train)
        self.window, self.skipped, self.rates, self.last = _Window(), 0, [], {}
        self.streak = 0  # non-finite micro-batches in a row at the last logged step
        self.saved = start  # the newest checkpoint's step

    def flush(self, step: int, evals: dict) -> None:
        """Writes the window's steps to the log and the progress line; raises
        :class:`NonFiniteError` after ``train.max_nonfinite`` skipped updates in a row."""
        fetched, elapsed = self.window.flush()
        rate = len(fetched) * self.tokens_per_step / elapsed
        self.rates.append((step - len(fetched), rate))
        for s, m in fetched:
            self.skipped += int(m["nonfinite"] > 0)
            self.streak = int(m["nonfinite"])
            self.last = {"step": s, "loss": m["loss_sum"] / max(m["count"], 1.0),
                         "accuracy": m["correct"] / max(m["count"], 1.0),
                         "grad_norm": m["grad_norm"], "learning_rate": self.lr(s - 1),
                         "tokens_per_second": rate, "skipped": self.skipped}
            if s == step:
                self.last.update(evals)
            self.log.write(self.last)
            if m["nonfinite"] >= self.train.max_nonfinite * self.train.grad_accum:
                raise NonFiniteError(
                    f"stopped at step {s}: {self.train.max_nonfinite} non-finite updates in a "
                    f"row were skipped (loss={self.last['loss']}, grad_norm="
                    f"{self.last['grad_norm']}); the newest checkpoint (step {self.saved}) is "
                    "from before them. Lower config.train.learning_rate, set "
                    "config.train.clip_norm, or use float32 activations "
                    "(config.model.dtype='float32').")
        self.progress(step, self.last["loss"], rate, elapsed / len(fetched))


def _train(resolved: Resolved, workdir: pathlib.Path, ckpt: Checkpointer, print_fn,
           wall_start: float, stop: StopSignals) -> dict[str, Any]:
    train, config = resolved.train, resolved.config
    optimizer = make_optimizer(train)
    parallel = make_parallel(resolved)
    state = create_state(lambda: build_model(resolved), optimizer, parallel)
    shardings = state_shardings(state, parallel)
    report = print_fn or (lambda line: None)
    start, restored = _restore(ckpt, state, config, workdir, report=report, quarantine=True)
    start = start or 0
    if start:
        state.params, state.rest, state.opt_state = (restored["params"], restored["rest"],
                                                     restored["opt_state"])
        report(f"resuming from step {start} in {workdir}")
    elif init_lib.requested(config):
        wrap = _remat_blocks if train.remat else (lambda model: None)
        state.params = init_lib.initial_params(config, state.params, seed=train.seed,
                                               wrap=wrap)
        report(f"starting from the weights of {init_lib.describe(config)}")
    main = is_main_process()
    if main and init_lib.requested(config):
        init_lib.copy_tokenizer(config, workdir)
    if main:
        (workdir / "config.json").write_text(configs_lib.to_json(config))
    train_ds, eval_ds = configs_lib.make_datasets(resolved)
    train_step = make_train_step(state.graphdef, optimizer, parallel=parallel,
                                 shardings=shardings)
    train_step = registry.announced(train_step, report)  # which backend serves attention
    eval_step = make_eval_step(state.graphdef, parallel=parallel, shardings=shardings)
    log = MetricsLog(workdir, start_step=start, tensorboard=main, write=main)
    run = _Run(resolved, log, Progress(train.steps, print_fn), start)
    params, rest, opt_state = state.params, state.rest, state.opt_state
    try:
        for step in range(start + 1, train.steps + 1):
            ckpt.check_errors()  # a failed background save stops the run here
            micro, batch = [], train_ds.batch(step - 1)
            for part in _split(batch, train.grad_accum):
                params, rest, opt_state, metrics = train_step(params, rest, opt_state, part)
                micro.append(metrics)
            run.window.add(step, _merge(micro))
            stopping = agree(stop.requested())
            evals = {}
            if step % train.eval_every == 0 or step == train.steps:
                evals = evaluate_params(eval_step, params, rest, eval_ds, train.eval_batches)
            save = step % train.checkpoint_every == 0 or step == train.steps or stopping
            # Log before saving, so every checkpointed step is in metrics.jsonl.
            if step % train.log_every == 0 or step == train.steps or evals or save:
                run.flush(step, evals)
            if save and run.streak:
                report(f"step {step}: not saved, its last {run.streak} updates were skipped as "
                       f"non-finite; the newest checkpoint stays step {run.saved}")
            elif save:
                ckpt.save(step, {"params": params, "rest": rest, "opt_state": opt_state},
                          {"step": step, "config": config.to_dict()},
                          eval_loss=evals.get("eval_loss"))
                run.saved = step
            if stopping:
                ckpt.wait()
                raise Preempted(
                    f"stopped by {stop.received or 'a signal on another host'} after step "
                    f"{step}; the newest checkpoint is step {run.saved} in "
                    f"{ckpt.directory}; rerun the same command to resume.")
    finally:
        log.close()
    last = run.last
    if start >= train.steps:  # nothing left to train: report the restored model
        last = dict(log.records[-1]) if log.records else {"loss": float("nan")}
        last.update(evaluate_params(eval_step, params, rest, eval_ds, train.eval_batches))
    if main:
        from tx.train import plots  # matplotlib is imported only when a run finishes
        plots.loss_curves({"run": log.records}, workdir / "loss.png", title=str(workdir.name))
    rates = run.rates
    steady = [r for s, r in rates if s > start] or [r for _, r in rates] or [float("nan")]
    first = log.records[0]["loss"] if log.records else float("nan")
    return {"steps": train.steps, "first_loss": float(first),
            "loss": float(last.get("loss", float("nan"))),
            "eval_loss": last.get("eval_loss"), "eval_accuracy": last.get("eval_accuracy"),
            "tokens_per_second": float(np.median(steady[1:] or steady)),
            "params": param_count(params), "kv_bytes_per_token": kv_bytes_per_token(resolved.model),
            "skipped": run.skipped, "wall_seconds": time.perf_counter() - wall_start}


def saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``workdir/config.json``, on one device when the
    run's mesh does not fit the devices here (a checkpoint restores under any mesh)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"workdir={str(workdir)!r} has no config.json; train there first or "
                          "pass --config.")
    return configs_lib.fit_mesh(ml_collections.ConfigDict(json.loads(path.read_text())))


def load_model(resolved: Resolved, workdir: str | pathlib.Path, *,
               step: int | None = None) -> tuple[nnx.Module, int | None]:
    """The model of the latest (or ``step``) checkpoint in ``workdir``, or a freshly initialised
    one (step ``None``) when there is none; its arrays are split over the config's mesh,
    whatever mesh the checkpoint was written under."""
    if not (pathlib.Path(workdir) / "checkpoints").is_dir():
        return build_model(resolved), None
    ckpt = Checkpointer(workdir, keep=resolved.train.keep, async_save=False)
    try:
        if not ckpt.all_steps():
            return build_model(resolved), None
        state = create_state(lambda: build_model(resolved), make_optimizer(resolved.train),
                             make_parallel(resolved))
        report = lambda line: print(line, file=sys.stderr)
        step, restored = _restore(ckpt, state, resolved.config, workdir, report=report,
                                  quarantine=False, step=step)
    finally:
        ckpt.close()
    if step is None:
        return build_model(resolved), None
    return nnx.merge(state.graphdef, restored["params"], restored["rest"]), step


def evaluate(config: ml_collections.ConfigDict | None, workdir: str | pathlib.Path, *,
             step: int | None = None, batches: int | None = None) -> dict[str, float]:
    """Evaluates the latest checkpoint (or ``step``) of ``workdir``; ``config=None`` uses the
    config saved with the run (on one device when its mesh does not fit the devices here)."""
    resolved = configs_lib.resolve(saved_config(workdir) if config is None else config)
    model, step = load_model(resolved, workdir, step=step)
    if step is None:
        raise ConfigError(f"workdir={str(workdir)!r} holds no complete checkpoint.")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    parallel = make_parallel(resolved)
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
