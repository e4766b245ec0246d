"""The training loop: ``run(config, workdir)`` trains, evaluates, checkpoints and resumes.

Rerunning the same config on the same workdir resumes from the latest complete checkpoint
(params, optimizer state, RNG, step = data position) and reproduces the uninterrupted run's
per-step losses exactly. A config that differs from the checkpoint's in a field that changes
the trajectory fails with a diff of those fields.

Through ``print_fn`` a run says, in order: the model in one line (:func:`model_summary`),
where it starts from (a resume or pretrained weights), ``compiling the train step``, which
backend serves attention (at the first step), a progress line every ``train.log_every`` steps,
and the eval loss and accuracy (``recall`` on MQAR) whenever they are computed.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tx.attention import memory as xl_memory
from tx.attention import registry
from tx.inference import memory
from tx.train import configs as configs_lib
from tx.train import pretrained as pretrained_lib
from tx.train.checkpoint import (CheckpointError, Checkpointer, background_errors_to,
                                 disk_full, is_disk_full)
from tx.train.configs import Resolved
from tx.train.evaluation import (accuracy_name, evaluate, evaluate_batches,  # noqa: F401
                                 evaluate_params)
from tx.train.lock import WorkdirLock
from tx.train.metrics import MetricsLog, Progress
from tx.train.optim import make_optimizer, schedule
from tx.train.preemption import Preempted, StopSignals, agree
from tx.train.step import create_state, make_eval_step, make_train_step, state_shardings
# Reading a run directory lives in tx.train.workdir; these names stay reachable here.
from tx.train.workdir import (Remat, build_model, load_model, make_parallel,  # noqa: F401
                              remat_blocks, restore, saved_config, saved_model_section)


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row."""


# ------------------------------------------------------------------ what a run says about itself


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def kv_bytes_per_token(cfg) -> int:
    """Self-attention K and V cache bytes one decoded token costs (0 for encoders), in an
    unbounded cache: linear layers (FAVOR+) keep a constant-size state and add nothing
    (``tx.inference.kv_cache_bytes`` gives whole caches, rolling windows included)."""
    if not getattr(cfg.head, "generates", False):
        return 0
    softmax = [m for m in memory.decoding_masks(cfg) if not hasattr(m, "state_bytes")]
    # An MLA layer stores one latent of ``latent_width`` values per token for all heads.
    values = sum(getattr(m, "latent_width", 2 * cfg.kv_heads * cfg.head_dim) for m in softmax)
    return values * jnp.dtype(cfg.dtype).itemsize


def model_summary(resolved: Resolved, params) -> str:
    """The run's model in one line: parameters, KV-cache bytes per decoded token, shape, e.g.
    ``model: 103,040 parameters | KV cache 1,024 bytes/token | 2 layers, d_model 64, 4 heads,
    1 K/V head, attention mqa``."""
    cfg = resolved.model
    plural = lambda n, word: f"{n} {word}{'s' * (n != 1)}"
    attention = resolved.config.model.get("attention")
    shape = [plural(cfg.num_layers, "layer"), f"d_model {cfg.d_model}",
             plural(cfg.attention.num_heads, "head")]
    # MLA layers have no K/V heads: each caches one latent per token for all its heads.
    masks = cfg.attention.masks  # the schedule as built: cycled over, or cut to, the layers
    masks = [masks[i % len(masks)] for i in range(cfg.num_layers)] if masks else []
    widths = sorted({m.latent_width for m in masks if hasattr(m, "latent_width")})
    if not widths or any(not hasattr(m, "latent_width") for m in masks):
        shape.append(plural(cfg.kv_heads, "K/V head"))
    if widths:
        shape.append(f"MLA latent {'/'.join(map(str, widths))} values/token")
    if attention:
        shape.append(f"attention {attention}")
    body = getattr(cfg.head, "body", None)  # a model that shortens rows (Funnel's pooling)
    if hasattr(body, "stages"):
        lengths = [str(s["length"]) for s in body.stages(resolved.data.seq_len)]
        shape.append(f"rows {' -> '.join(lengths)} tokens")
    return (f"model: {param_count(params):,} parameters | KV cache "
            f"{kv_bytes_per_token(cfg):,} bytes/token | {', '.join(shape)}")


def eval_line(step: int, evals: dict, metric: str = "accuracy") -> str:
    """``eval at step 100: loss 1.1835, recall 0.523``."""
    return (f"eval at step {step}: loss {evals['eval_loss']:.4f}, {metric} "
            f"{evals['eval_accuracy']:.3f}")


def _announced(step_fn: Callable, say: Callable[[str], None]) -> Callable:
    """``step_fn`` whose calls that trace say which backend served attention, e.g.
    ``attention: cpu (2 calls)``: each line once per run (every variant of an ablation says
    its own)."""
    said = set()

    def call(*args):
        with registry.recording() as records:
            out = step_fn(*args)
        line = registry.summary(records) if records else None
        if line and line not in said:
            said.add(line)
            say(line)
        return out
    return call


# -------------------------------------------------------------------------------- resuming


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
    ``kv_bytes_per_token``, ``steps``, ``skipped``, ``wall_seconds`` and ``accuracy_name``
    (what the eval accuracy measures: ``recall`` on MQAR).

    Holds ``workdir``'s lock for the whole run (a second run there fails at once). SIGTERM or
    SIGINT ends the run after the current step with a saved checkpoint and :class:`Preempted`;
    a failed background save raises :class:`CheckpointError` at the next step, and a full disk
    (checkpoints, logs, plots) a :class:`CheckpointError` naming the path it was writing."""
    wall_start = time.perf_counter()
    config = pretrained_lib.with_source_model(config, saved_model_section(workdir))
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


def _with_memory(model, resolved: Resolved):
    """``model`` with an empty Transformer-XL memory per layer when the config asks for one
    (``model.memory_length``): part of the state's ``rest``, so carried from step to step and
    checkpointed, and a resumed run continues with the memory it stopped with."""
    length = resolved.model.memory_length
    if length:
        if resolved.train.grad_accum != 1:
            raise configs_lib.ConfigError(
                f"config.train.grad_accum={resolved.train.grad_accum}: with "
                f"model.memory_length={length} each row continues the same row of the previous "
                "step, which micro-batches of other rows would break; use grad_accum=1.")
        xl_memory.init_memory(model, resolved.micro_batch, length)
    return model


def _check_contiguous(resolved: Resolved, dataset) -> None:
    length = resolved.model.memory_length
    if length and not getattr(dataset, "contiguous", False):
        raise configs_lib.ConfigError(
            f"config.model.memory_length={length}: the memory needs each row to continue the "
            f"previous step's row, which data {resolved.data.name!r} does not promise; set "
            "config.data.options.contiguous=True (data bytes) or memory_length=0.")


def _eval_rest(resolved: Resolved, rest):
    """Eval rows start without the training memory (they do not continue its rows)."""
    return xl_memory.cleared(rest) if resolved.model.memory_length else rest


def _train(resolved: Resolved, workdir: pathlib.Path, ckpt: Checkpointer, print_fn,
           wall_start: float, stop: StopSignals) -> dict[str, Any]:
    train, config = resolved.train, resolved.config
    optimizer = make_optimizer(train)
    parallel = make_parallel(resolved)
    state = create_state(lambda: _with_memory(build_model(resolved), resolved), optimizer,
                         parallel)
    shardings = state_shardings(state, parallel)
    report = print_fn or (lambda line: None)
    report(model_summary(resolved, state.params))
    start, restored = restore(ckpt, {"params": state.params, "rest": state.rest,
                                     "opt_state": state.opt_state}, config, workdir,
                              report=report, quarantine=True)
    start = start or 0
    if start:
        state.params, state.rest, state.opt_state = (restored["params"], restored["rest"],
                                                     restored["opt_state"])
        report(f"resuming from step {start} in {workdir}")
    elif pretrained_lib.requested(config):
        wrap = remat_blocks if train.remat else (lambda model: None)
        state.params = pretrained_lib.initial_params(config, state.params, seed=train.seed,
                                                     wrap=wrap)
        report(f"starting from the weights of {pretrained_lib.describe(config)}")
    main = is_main_process()
    if main and pretrained_lib.requested(config):
        pretrained_lib.copy_tokenizer(config, workdir)
    if main:
        (workdir / "config.json").write_text(configs_lib.to_json(config))
    train_ds, eval_ds = configs_lib.make_datasets(resolved)
    _check_contiguous(resolved, train_ds)
    train_step = make_train_step(state.graphdef, optimizer, parallel=parallel,
                                 shardings=shardings)
    train_step = _announced(train_step, report)  # which backend serves attention
    eval_step = make_eval_step(state.graphdef, parallel=parallel, shardings=shardings)
    metric = accuracy_name(eval_ds)
    if start < train.steps:
        report("compiling the train step")
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
                evals = evaluate_params(eval_step, params, _eval_rest(resolved, rest), eval_ds,
                                        train.eval_batches)
                report(eval_line(step, evals, metric))
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
        last.update(evaluate_params(eval_step, params, _eval_rest(resolved, rest), eval_ds,
                                    train.eval_batches))
        report(eval_line(start, last, metric))
    if main:
        from tx.research import plots  # matplotlib is imported only when a run finishes
        plots.loss_curves({workdir.name: log.records}, workdir / "loss.png",
                          title=str(workdir.name), metric=metric)
    rates = run.rates
    steady = [r for s, r in rates if s > start] or [r for _, r in rates] or [float("nan")]
    first = log.records[0]["loss"] if log.records else float("nan")
    return {"steps": train.steps, "first_loss": float(first),
            "loss": float(last.get("loss", float("nan"))),
            "eval_loss": last.get("eval_loss"), "eval_accuracy": last.get("eval_accuracy"),
            "tokens_per_second": float(np.median(steady[1:] or steady)),
            "params": param_count(params), "kv_bytes_per_token": kv_bytes_per_token(resolved.model),
            "skipped": run.skipped, "wall_seconds": time.perf_counter() - wall_start,
            "accuracy_name": metric}
