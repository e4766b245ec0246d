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
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tx.parallel.shard import is_prng_key


def _to_savable(tree):
    """Typed PRNG keys -> their uint32 key data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def _from_savable(restored, template):
    def back(r, t):
        return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if is_prng_key(t) else r
    return jax.tree.map(back, restored, template)


def _abstract(tree):
    """Restore targets in the template's own shardings: a checkpoint written under one mesh
    restores under another (or on one device); Orbax reads each device's slices only."""
    def spec(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(spec, _to_savable(tree))


class Checkpointer:
    """``save(step, state, meta, eval_loss)``, ``latest_step()``, ``restore(step, template)``."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int, keep_best: int = 0,
                 async_save: bool = True):
        workdir = pathlib.Path(workdir).absolute()
        opts = dict(enable_async_checkpointing=async_save, create=True,
                    cleanup_tmp_directories=True)
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
        self.best = None
        if keep_best:
            self.best = ocp.CheckpointManager(
                workdir / "best", options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best, best_fn=lambda m: m["eval_loss"], best_mode="min",
                    keep_checkpoints_without_metrics=False, **opts))

    @staticmethod
    def _args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(_to_savable(state)),
                                  meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any],
             eval_loss: float | None = None) -> None:
        """Starts an (async) save; errors of earlier saves surface here or in ``close``."""
        self.latest.save(step, args=self._args(state, meta), force=True)
        if self.best is not None and eval_loss is not None and np.isfinite(eval_loss):
            self.best.save(step, args=self._args(state, meta),
                           metrics={"eval_loss": float(eval_loss)}, force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, step: int, template: dict[str, Any], manager=None):
        """-> (state shaped like ``template``, meta dict)."""
        manager = manager or self.latest
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()))
        return _from_savable(out["state"], template), out["meta"]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.latest.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        for m in (self.latest, self.best):
            if m is not None:
                m.wait_until_finished()
                m.check_for_errors()

    def close(self) -> None:
        self.wait()
        for m in (self.latest, self.best):
            if m is not None:
                m.close()
