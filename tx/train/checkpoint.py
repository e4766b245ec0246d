"""Checkpoints with Orbax ``CheckpointManager``: atomic, asynchronous, latest-N and best-N.

Two managers under the workdir: ``checkpoints/`` keeps the latest ``train.keep`` saves (what a
rerun resumes from; the latest is never deleted) and, with ``train.keep_best > 0``,
``best/`` keeps the best saves by eval loss. Orbax writes each save into a temporary directory
and renames it when complete, so a save killed mid-write is never listed as a step.

A save holds the train state (params, rest = RNG counters and other non-parameter variables,
opt_state), the step (which is also the data position: batches are pure functions of the step)
and the resolved config as JSON. Arrays are restored in the shardings of the template (the
current run's state), so a checkpoint written under one device mesh restores under another, on
one device, or on CPU. On several hosts every process calls ``save`` and ``restore``: Orbax
writes and reads collectively (each process its own shards) into one shared directory.

Every save records a checksum per array (:mod:`tx.train.integrity`) in its metadata, and a
restore verifies them: a checkpoint that was altered on disk or cannot be read raises a
one-line :class:`CheckpointError` naming the step and the array, and
:meth:`Checkpointer.restore_good` falls back to the newest checkpoint that verifies. A state
holding NaN or Inf is never saved.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import pathlib
import re
import sys
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tx.parallel.shard import is_prng_key
from tx.train import integrity


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification, cannot be read, or cannot be written."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from) says the disk is full: ``ENOSPC`` (or
    ``EDQUOT``, a full quota), "No space left", or TensorStore's ``RESOURCE_EXHAUSTED: Error
    writing ...`` as Orbax passes it on (not XLA's ``RESOURCE_EXHAUSTED``: out of memory)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in text or ("resource_exhausted" in text and "writing" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(path: str | pathlib.Path) -> CheckpointError:
    """The one-line error of a write to ``path`` that found the disk full."""
    return CheckpointError(f"disk full while writing {path}: free space or pick another "
                           "--workdir")


def _is_key(x) -> bool:
    """A typed PRNG key: an array, or the ``ShapeDtypeStruct`` of one (an abstract target)."""
    return is_prng_key(x) or (isinstance(x, jax.ShapeDtypeStruct) and
                              jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _to_savable(tree):
    """Typed PRNG keys -> their uint32 key data (Orbax stores plain arrays)."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct) and _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
        return jax.random.key_data(x) if is_prng_key(x) else x
    return jax.tree.map(one, tree)


def _from_savable(restored, template):
    def back(r, t):
        if isinstance(t, jax.ShapeDtypeStruct):
            return jax.random.wrap_key_data(r, dtype=t.dtype) if _is_key(t) else r
        return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if is_prng_key(t) else r
    return jax.tree.map(back, restored, template)


def _abstract(tree):
    """Restore targets in the template's own shardings: a checkpoint written under one mesh
    restores under another (or on one device); Orbax reads each device's slices only. The
    template holds arrays, or ``ShapeDtypeStruct``s (with or without a sharding)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def spec(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    return jax.tree.map(spec, _to_savable(tree))


class Checkpointer:
    """``save(step, state, meta, eval_loss)``, ``latest_step()``, ``restore(step, template)``."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int, keep_best: int = 0,
                 async_save: bool = True):
        workdir = pathlib.Path(workdir).absolute()
        # Directories are created before save() returns: created in the background, a failure
        # there (the directory turned unwritable) left Orbax's signal threads waiting out their
        # timeout, which kept the interpreter alive for minutes after the error was reported.
        opts = dict(enable_async_checkpointing=async_save, create=True,
                    cleanup_tmp_directories=True,
                    async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
        self.best = None
        if keep_best:
            self.best = ocp.CheckpointManager(
                workdir / "best", options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best, best_fn=lambda m: m["eval_loss"], best_mode="min",
                    keep_checkpoints_without_metrics=False, **opts))

        self.directory = workdir / "checkpoints"
        self._reader = None  # a manager that reads parts of a save (restore(partial=True))
        self.quarantine_dir = workdir / "corrupt"
        self.error_log = workdir / "checkpoint_errors.log"

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any],
             eval_loss: float | None = None) -> None:
        """Starts an (async) save; errors of earlier saves surface here, in
        :meth:`check_errors` or in ``close``. Refuses a state holding NaN or Inf."""
        savable = _to_savable(state)
        checksums, finite = integrity.summarise(savable)
        if not finite:
            raise CheckpointError(f"not saving step {step}: the train state holds NaN or Inf "
                                  "values; the newest checkpoint is from before them.")
        args = ocp.args.Composite(state=ocp.args.StandardSave(savable),
                                  meta=ocp.args.JsonSave({**meta, "checksums": checksums}))
        self._guarded(lambda: self.latest.save(step, args=args, force=True))
        if self.best is not None and eval_loss is not None and np.isfinite(eval_loss):
            self._guarded(lambda: self.best.save(
                step, args=args, metrics={"eval_loss": float(eval_loss)}, force=True))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.latest.all_steps())

    def restore(self, step: int, template: dict[str, Any], manager=None, *,
                partial: bool = False):
        """-> (state shaped like ``template``, meta dict), verified against the checksums
        saved with it; a :class:`CheckpointError` names the step and the array otherwise.
        ``partial``: ``template`` names some of the saved items (e.g. ``params`` and
        ``rest``, not ``opt_state``), and only those are read."""
        where = f"checkpoint {step} in {(manager or self.latest).directory}"
        target = _abstract(template)
        try:
            if partial:
                out = self._partial_reader().restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target, partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
                    meta=ocp.args.JsonRestore()))
            else:
                out = (manager or self.latest).restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:  # TensorStore and Orbax errors run to many lines
            raise CheckpointError(f"{where} cannot be read{_array_named(e)}: "
                                  f"{_first_line(e)}") from e
        saved = out["meta"].get("checksums")
        if saved is not None:  # checkpoints written before checksums verify nothing
            read, _ = integrity.summarise(out["state"])
            if partial:  # the arrays read, each of which the save must hold
                saved = {name: saved[name] for name in read if name in saved}
            bad = integrity.first_mismatch(saved, read)
            if bad is not None:
                raise CheckpointError(f"{where} is corrupt: array {bad} does not match the "
                                      "checksum saved with it")
        return _from_savable(out["state"], template), out["meta"]

    def _partial_reader(self):
        """A reading manager of ``checkpoints/`` whose state item is read as a plain
        PyTree, so that a restore may name only some of its items (the saves are the same
        on disk: ``StandardSave`` writes a PyTree)."""
        if self._reader is None:
            self._reader = ocp.CheckpointManager(
                self.directory,
                item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()},
                options=ocp.CheckpointManagerOptions(create=False,
                                                     enable_async_checkpointing=False))
        else:
            self._reader.reload()
        return self._reader

    def restore_good(self, template: dict[str, Any], *, report, quarantine: bool,
                     check=lambda meta, step: None, partial: bool = False
                     ) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that reads and verifies: -> (step, state, meta), or ``None``
        when there is no checkpoint. Each bad one is reported in one line through ``report``
        and, with ``quarantine`` (the training run, which holds the workdir lock), moved to
        ``workdir/corrupt/``; readers (evaluation, generation) leave it in place.
        ``check(meta, step)`` vets a checkpoint's metadata before its arrays are read;
        ``partial`` as in :meth:`restore`."""
        steps, bad = self.all_steps(), []
        for step in reversed(steps):
            try:
                check(self.read_meta(step), step)
                state, meta = self.restore(step, template, partial=partial)
                return step, state, meta
            except CheckpointError as e:
                bad.append(step)
                moved = self._quarantine(step) if quarantine else None
                report(f"{e}; {'moved to ' + str(moved) + '; ' if moved else ''}"
                       "falling back to the previous checkpoint")
        if bad:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored (bad: "
                                  f"{bad}); start a fresh run in a new --workdir")
        return None

    def _quarantine(self, step: int):
        """Moves a bad step out of Orbax's sight (kept, never deleted): process 0 moves it,
        every process then re-reads the step list."""
        target = self.quarantine_dir / str(step)
        if jax.process_index() == 0:
            self.quarantine_dir.mkdir(exist_ok=True)
            n = 1
            while target.exists():
                target, n = self.quarantine_dir / f"{step}.{n}", n + 1
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"tx_quarantine_{step}")
        self.latest.reload()
        return target

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            return self.latest.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory} has unreadable "
                                  f"metadata: {_first_line(e)}") from e

    def _guarded(self, call):
        """Runs an Orbax call, turning a failed (background) save into one line."""
        try:
            return call()
        except CheckpointError:
            raise
        except Exception as e:
            if is_disk_full(e):
                raise disk_full(self.directory) from e
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: "
                                  f"{_first_line(e)}; free space or fix permissions there, "
                                  "then rerun to resume from the last good checkpoint "
                                  f"(details: {self.error_log})") from e

    def check_errors(self) -> None:
        """Raises the error of a finished background save, if any (does not block)."""
        for m in (self.latest, self.best):
            if m is not None:
                self._guarded(m.check_for_errors)

    def wait(self) -> None:
        for m in (self.latest, self.best):
            if m is not None:
                self._guarded(m.wait_until_finished)
                self._guarded(m.check_for_errors)

    def close(self) -> None:
        """Waits for the last save and stops Orbax's threads, even when a save failed (its
        threads would otherwise keep the interpreter alive); then raises that failure."""
        error = None
        try:
            self.wait()
        except CheckpointError as e:
            error = e
        for m in (self.latest, self.best, self._reader):
            if m is not None:
                try:
                    m.close()
                except Exception as e:  # already reported through ``error`` if it was a save
                    error = error or CheckpointError(f"closing {self.directory}: "
                                                     f"{_first_line(e)}")
        if error is not None:
            raise error


class background_errors_to(contextlib.ContextDecorator):
    """Sends what a failed background save prints into ``path`` instead of the terminal.

    A save that fails in Orbax's threads logs each thread's traceback, and TensorStore writes
    still in flight then report into a closed event loop: hundreds of lines before the run
    notices. The run reports the failure itself in one line (:class:`CheckpointError`), so
    this keeps the details in a file it names. Only Orbax's ERROR records and the closed-loop
    reports are diverted; everything else prints as before."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)

    def _write(self, text: str) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        except OSError:  # a full disk: the run still reports the failure in one line
            pass

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        self._write(logging.Formatter().format(record))
        return False

    def _hook(self, args):
        """``sys.unraisablehook``: TensorStore reports callbacks that fail in its threads."""
        value = args.exc_value
        if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
            self._write("".join(traceback.format_exception(args.exc_type, value,
                                                           args.exc_traceback)))
        else:
            self._previous(args)

    def __enter__(self):
        logging.getLogger("absl").addFilter(self)
        self._previous, sys.unraisablehook = sys.unraisablehook, self._hook
        return self

    def __exit__(self, kind, value, tb):
        if isinstance(value, CheckpointError):
            return False  # writes still in flight report later: keep diverting them
        logging.getLogger("absl").removeFilter(self)
        sys.unraisablehook = self._previous
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0].split(" See full TensorStore details")[0]
    return line if len(line) <= 300 else line[:300] + "..."


def _array_named(e: BaseException) -> str:
    """`` (array a.b.c)`` when the error names the array it failed on: TensorStore's spec
    holds the array's key in the checkpoint as a relative ``path``."""
    found = re.search(r"'path': '([^/'][^']*?)/?'", str(e))
    return f" (array {found.group(1)})" if found else ""
