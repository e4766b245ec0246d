"""Reading a run directory: the config a run saved, its model, and its checkpoints.

A run's ``workdir`` holds ``config.json`` (the resolved config) and ``checkpoints/<step>``
(params, rest = RNG counters and other non-parameter variables, opt_state; see
:mod:`tx.train.checkpoint`). Evaluation, generation and export read the parameters only
(:func:`load_model`: no optimizer state is built or read); the training loop restores whole
train states through :func:`restore` to resume; a pretrained start (:mod:`tx.train.pretrained`)
loads another run's model. Both the loop and pretrained starts import this module, and it
imports neither.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import jax
import ml_collections
from flax import nnx

from tx import models
from tx import parallel as parallel_lib
from tx.layers.block import Block
from tx.train import configs as configs_lib
from tx.train.checkpoint import Checkpointer
from tx.train.configs import ConfigError, Resolved
from tx.train.optim import warmup_steps

# -------------------------------------------------------------------------------- the model


class Remat(nnx.Module):
    """Wraps a block so its activations are recomputed in the backward pass."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return nnx.remat(lambda block, a, k: block(*a, **k))(self.inner, args, kwargs)


def remat_blocks(model: nnx.Module) -> None:
    """Wraps every ``Block`` in place; the model is walked with ``nnx.iter_graph``, and
    towers find their attention layers the same way, through the wrapper."""
    for _, towers in list(nnx.iter_graph(model)):
        if isinstance(towers, models.Tower):
            for i, block in enumerate(towers.blocks):
                if isinstance(block, Block):
                    towers.blocks[i] = Remat(block)


def build_model(resolved: Resolved) -> nnx.Module:
    """A freshly initialised model of the config (blocks wrapped when ``train.remat``)."""
    model = models.build(resolved.model, seed=resolved.train.seed)
    if resolved.train.remat:
        remat_blocks(model)
    return model


def make_parallel(resolved: Resolved) -> parallel_lib.Parallel:
    """The config's device mesh (one device by default)."""
    mesh = resolved.mesh
    return parallel_lib.Parallel(parallel_lib.make_mesh(mesh),
                                 context_attention=mesh.context_attention)


# ----------------------------------------------------------------------------- the config


def saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``workdir/config.json``, on one device when the
    run's mesh does not fit the devices here (a checkpoint restores under any mesh)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"workdir={str(workdir)!r} has no config.json; train there first or "
                          "pass --config.")
    return configs_lib.fit_mesh(ml_collections.ConfigDict(json.loads(path.read_text())))


def saved_model_section(workdir: str | pathlib.Path) -> dict | None:
    """The model section a run in ``workdir`` saved, when it has checkpoints to resume."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file() or not any(
            p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        return None
    return json.loads((workdir / "config.json").read_text()).get("model")


def check_compatible(saved: dict, current: ml_collections.ConfigDict, workdir, step) -> None:
    """Fails with the diff of the fields that change the trajectory when ``current`` differs
    from the config ``saved`` with checkpoint ``step``."""
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


# ---------------------------------------------------------------------------- checkpoints


def restore(ckpt: Checkpointer, template: dict, config, workdir, *, report, quarantine: bool,
            step: int | None = None, partial: bool = False):
    """-> (step, arrays) of the newest checkpoint that verifies (or of ``step``), shaped like
    ``template`` (a dict of some or, without ``partial``, all of ``params``, ``rest`` and
    ``opt_state``) and in its shardings; ``(None, None)`` when there is none."""
    check = lambda meta, s: check_compatible(meta["config"], config, workdir, s)
    if step is not None:  # an explicit step: its own verdict, no fallback
        check(ckpt.read_meta(step), step)
        return step, ckpt.restore(step, template, partial=partial)[0]
    found = ckpt.restore_good(template, report=report, quarantine=quarantine, check=check,
                              partial=partial)
    return (None, None) if found is None else found[:2]


def abstract_model(resolved: Resolved, parallel: parallel_lib.Parallel | None = None):
    """-> (graphdef, params, rest) of the config's model as ``jax.ShapeDtypeStruct``s in the
    shardings of ``parallel``'s mesh (one device by default): restore targets, no arrays
    allocated or initialised."""
    model = nnx.eval_shape(lambda: build_model(resolved))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    parallel = parallel or make_parallel(resolved)
    if parallel.size > 1:
        shardings = parallel.shardings((params, rest))
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, (params, rest))
    params, rest = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), (params, rest),
        shardings)
    return graphdef, params, rest


def load_model(resolved: Resolved, workdir: str | pathlib.Path, *,
               step: int | None = None) -> tuple[nnx.Module, int | None]:
    """The model of the latest (or ``step``) checkpoint in ``workdir``, or a freshly initialised
    one (step ``None``) when there is none. Only the parameters (and the other model
    variables) are read, never the optimizer state; the arrays are split over the config's
    mesh, whatever mesh the checkpoint was written under."""
    if not (pathlib.Path(workdir) / "checkpoints").is_dir():
        return build_model(resolved), None
    ckpt = Checkpointer(workdir, keep=resolved.train.keep, async_save=False)
    try:
        if not ckpt.all_steps():
            return build_model(resolved), None
        graphdef, params, rest = abstract_model(resolved)
        report = lambda line: print(line, file=sys.stderr)
        step, restored = restore(ckpt, {"params": params, "rest": rest}, resolved.config,
                                 workdir, report=report, quarantine=False, step=step,
                                 partial=True)
    finally:
        ckpt.close()
    if step is None:
        return build_model(resolved), None
    return nnx.merge(graphdef, restored["params"], restored["rest"]), step
