"""Experiment configs: one ``ml_collections.ConfigDict`` with ``model``, ``data``, ``train`` and
``mesh``.

``model`` holds exactly the flat flags of :class:`tx.flags.ModelFlags` (``None`` defaults become
typed placeholders so ``--config.model.num_kv_heads=2`` type-checks), which
:func:`tx.flags.parse` turns into the value tree :class:`tx.config.ModelConfig`; ``data`` names a
``tx.data`` dataset and its options; ``train`` holds the loop's knobs (see :data:`TRAIN`);
``mesh`` the ``data``/``fsdp``/``tensor`` degrees (:class:`tx.parallel.MeshConfig`, all 1 by
default; a config without a ``mesh`` section runs on one device).
:func:`resolve` validates all three up front, so a bad flag fails before any compile with a
:class:`ConfigError` that names the field, its value and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from tx import data as data_lib
from tx import flags as flags_lib
from tx.config import ModelConfig
from tx.flags import ModelFlags
from tx.parallel import MeshConfig

# The training knobs and their defaults; a config file overrides some of them.
TRAIN = dict(
    steps=200,  # optimizer updates (where the run stops)
    schedule_steps=0,  # learning-rate schedule length; 0: train.steps at the run's start
    batch_size=16,  # examples per update (split into grad_accum micro-batches)
    grad_accum=1,
    learning_rate=3e-3,
    min_learning_rate_ratio=0.1,  # cosine decay ends at learning_rate * this
    warmup_steps=-1,  # linear warm-up updates; -1: min(20, schedule length // 10)
    weight_decay=0.01,
    b1=0.9,
    b2=0.98,
    clip_norm=1.0,  # global-norm clipping; 0 disables
    max_nonfinite=5,  # stop after this many non-finite updates in a row (each is skipped)
    seed=0,  # model init and data order
    remat=False,  # recompute each block's activations in the backward pass
    log_every=10,
    eval_every=100,
    eval_batches=4,
    checkpoint_every=100,
    keep=3,  # latest checkpoints kept (the latest is never deleted)
    keep_best=0,  # also keep this many best-by-eval-loss checkpoints (0: off)
    async_checkpoints=True,
)
MESH = dict(data=1, fsdp=1, tensor=1, context=1, context_attention="ring")
# Pretrained starts (tx.train.pretrained): a source of weights and the swaps applied to them.
INIT = dict(hf="", workdir="", swap=dict(num_kv_heads=0, kv_init="mean", layer_pattern="",
                                         window=0))
# Decoding options of the run's model (generate.py, bench_decode.py): how the KV cache stores
# keys and values (``tx.flags.kv_storage``: auto, int8, int4 (KIVI, paged), int4_per_token).
INFERENCE = dict(kv_dtype="auto")
# Fields that may change between a run and its resumption (they do not alter the trajectory;
# a checkpoint restores under any mesh). Growing ``train.steps`` extends a run on the schedule
# it started with (``train.schedule_steps`` is saved with the run).
MAX_LEARNING_RATE = 10.0
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.checkpoint_every", "train.keep", "train.keep_best",
                     "train.async_checkpoints", "mesh.data", "mesh.fsdp", "mesh.tensor",
                     "mesh.context", "mesh.context_attention", "inference.kv_dtype")


class ConfigError(ValueError):
    """A config or flag value that cannot work; the message names the field and the fix."""


def _hints() -> dict[str, Any]:
    """Every model flag (``tx.flags.fields()``: the core ones and those registered variants
    declare)."""
    return flags_lib.fields()


def model_dict(cfg: ModelFlags | None = None, **changes) -> ml_collections.ConfigDict:
    """``ModelFlags`` fields as a ConfigDict; ``None`` values become typed placeholders."""
    cfg = (cfg or ModelFlags()).replace(**changes)
    out = ml_collections.ConfigDict()
    for name, field in _hints().items():
        value = getattr(cfg, name)
        out[name] = config_dict.placeholder(field.type) if value is None else value
    return out


def experiment(model: ModelFlags, *, dataset: str, seq_len: int, options: dict | None = None,
               extensions: tuple[str, ...] = (), **train) -> ml_collections.ConfigDict:
    """A full experiment config: ``model``, ``data`` (``name``, ``seq_len``, ``options``) and
    ``train`` (:data:`TRAIN` updated by ``train``). ``extensions``: Python files that register
    variants the config names (e.g. ``[__file__]`` in a config file that registers its own);
    :func:`resolve` imports them first, so a saved run reopens from its workdir alone."""
    unknown = sorted(set(train) - set(TRAIN))
    if unknown:
        raise ConfigError(f"train fields {unknown} do not exist; known: {sorted(TRAIN)}")
    config = ml_collections.ConfigDict()
    config.model = model_dict(model)
    config.data = ml_collections.ConfigDict(dict(
        name=dataset, seq_len=seq_len, eval_seq_len=config_dict.placeholder(int),
        options=dict(options or {})))
    config.train = ml_collections.ConfigDict({**TRAIN, **train})
    config.mesh = ml_collections.ConfigDict(MESH)
    config.init = ml_collections.ConfigDict(INIT)
    config.inference = ml_collections.ConfigDict(INFERENCE)
    if extensions:
        config.extensions = [str(pathlib.Path(p).resolve()) for p in extensions]
    return config


_EXTENSIONS: set[str] = set()  # files imported by load_extensions in this process


def _imported(path: str) -> bool:
    """Whether this process already ran ``path`` (here, or as the ``--config`` file, which
    ml_collections imports as a module)."""
    return path in _EXTENSIONS or any(
        getattr(m, "__file__", None) and os.path.abspath(m.__file__) == path
        for m in list(sys.modules.values()))


def load_extensions(config: ml_collections.ConfigDict) -> None:
    """Imports each file of ``config.extensions`` once per process, so the names it registers
    (patterns, positions, heads, implementations, datasets) resolve."""
    for path in config.get("extensions", ()):
        if _imported(path):
            continue
        if not pathlib.Path(path).is_file():
            raise ConfigError(f"config.extensions: {path!r} is not a file; restore it or drop it "
                              "from the config.")
        spec = importlib.util.spec_from_file_location(f"_txext_{pathlib.Path(path).stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        _EXTENSIONS.add(path)


def load_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file (how a config derives from a sibling file)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"_txconfig_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def sibling(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``configs/<name>.py`` next to ``this_file``."""
    return load_file(pathlib.Path(this_file).with_name(f"{name}.py"), arg)


# ------------------------------------------------------------------------------ resolution


@dataclasses.dataclass(frozen=True)
class Resolved:
    model: ModelConfig  # the value tree
    config: ml_collections.ConfigDict  # the full config (a locked copy)
    flags: ModelFlags  # config.model as flags

    @property
    def train(self):
        return self.config.train

    @property
    def data(self):
        return self.config.data

    @property
    def micro_batch(self) -> int:
        return self.train.batch_size // self.train.grad_accum

    @property
    def mesh(self) -> MeshConfig:
        return mesh_config(self.config)


def model_flags(model: ml_collections.ConfigDict) -> ModelFlags:
    values = model.to_dict()
    unknown = sorted(set(values) - set(_hints()))
    if unknown:
        raise ConfigError(f"model fields {unknown} are not model flags; known: "
                          f"{sorted(_hints())}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return ModelFlags(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model.{e}") from None


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
    """The value tree of ``config.model``."""
    return _parse(model_flags(model))


def _parse(flags: ModelFlags) -> ModelConfig:
    try:
        return flags_lib.parse(flags)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def mesh_config(config: ml_collections.ConfigDict) -> MeshConfig:
    """The config's mesh degrees (all 1 when it has no ``mesh`` section)."""
    values = config.mesh.to_dict() if "mesh" in config else {}
    unknown = sorted(set(values) - set(MESH))
    if unknown:
        raise ConfigError(f"config.mesh fields {unknown} do not exist; known: {sorted(MESH)}")
    try:
        return MeshConfig(**values)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def _check_mesh(resolved: Resolved) -> None:
    """Before anything compiles: the mesh fits the devices, splits heads and batches evenly."""
    mesh, train = resolved.mesh, resolved.train
    field = "train.batch_size" if train.grad_accum == 1 else \
        f"train.batch_size / train.grad_accum ({train.batch_size} / {train.grad_accum})"
    try:
        mesh.check_heads(resolved.model.num_heads, resolved.model.kv_heads)
        mesh.check_context(resolved.model.num_heads, resolved.model.kv_heads)
        for name in ("seq_len", "eval_seq_len"):  # a sequence split over mesh.context
            d = resolved.data
            mesh.check_sequence(d.seq_len if name == "seq_len" else eval_seq_len(d),
                                f"data.{name}")
        _check_context_layers(resolved)
        mesh.check_batch(resolved.micro_batch, field)
        mesh.check_devices()
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def _check_context_layers(resolved: Resolved) -> None:
    """A split sequence runs only through softmax attention: the model's other mixers
    (FNet, FAVOR+, the recurrent layers) are named here, built abstractly, not compiled."""
    if resolved.mesh.context == 1:
        return
    from flax import nnx  # noqa: PLC0415  (only a context-parallel config builds a model)

    from tx import models  # noqa: PLC0415
    from tx.parallel import context  # noqa: PLC0415
    bad = context.unshardable(nnx.eval_shape(lambda: models.build(resolved.model)))
    if bad:
        raise ValueError(
            f"mesh.context={resolved.mesh.context} splits the sequence, but these layers mix "
            f"it by other means than softmax attention and cannot be split: {', '.join(bad)}"
            "; use mesh.context=1 for this model (or softmax layers only).")


def fit_mesh(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with a one-device mesh when its mesh does not fit the devices here (how a
    run saved on many devices is evaluated on one)."""
    try:
        mesh_config(config).check_devices()
        return config
    except ValueError:
        config = ml_collections.ConfigDict(config.to_dict())
        config.mesh = ml_collections.ConfigDict(MESH)
        return config


def _check_train(train) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                 "eval_batches", "checkpoint_every", "keep", "max_nonfinite"):
        value = train[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.train.{name}={value!r}: must be a positive integer.")
    for name in ("warmup_steps", "keep_best", "seed", "schedule_steps"):
        if isinstance(train[name], bool) or not isinstance(train[name], int) or train[name] < 0:
            if name == "warmup_steps" and train[name] == -1:
                continue  # the default: resolved by tx.train.optim.warmup_steps
            raise ConfigError(f"config.train.{name}={train[name]!r}: must be an integer >= 0"
                              + (" (or -1: min(20, schedule length // 10))."
                                 if name == "warmup_steps" else "."))
    if train.batch_size % train.grad_accum:
        raise ConfigError(f"config.train.grad_accum={train.grad_accum}: must divide "
                          f"train.batch_size={train.batch_size}; pick a divisor.")
    if not 0 < train.learning_rate <= MAX_LEARNING_RATE:  # NaN fails too
        raise ConfigError(f"config.train.learning_rate={train.learning_rate}: must be finite, "
                          f"> 0 and <= {MAX_LEARNING_RATE:g}; typical values are 1e-4 to 1e-2.")
    length = train.schedule_steps or train.steps
    if train.warmup_steps >= length:  # -1 (auto) never fails
        raise ConfigError(f"config.train.warmup_steps={train.warmup_steps}: must be < the "
                          f"schedule length (train.schedule_steps or train.steps) = {length}.")
    if train.clip_norm < 0:
        raise ConfigError(f"config.train.clip_norm={train.clip_norm}: use 0 (off) or > 0.")


def _set_options(options) -> dict:
    """Dataset options minus unset placeholders (``None``), which keep the dataset's default."""
    return {k: v for k, v in options.to_dict().items() if v is not None}


def make_datasets(resolved: Resolved):
    """(train, eval) datasets of the config at ``train.batch_size`` (the loop splits a batch
    into micro-batches, so the data order does not depend on ``grad_accum``)."""
    d = resolved.data
    lengths = {"train": d.seq_len, "eval": eval_seq_len(d)}
    try:
        return tuple(data_lib.make_dataset(d.name, batch_size=resolved.train.batch_size,
                                           seq_len=lengths[split], seed=resolved.train.seed,
                                           split=split, **_set_options(d.options))
                     for split in ("train", "eval"))
    except ValueError as e:
        raise ConfigError(f"config.data (name={d.name!r}): {e}") from None


def eval_seq_len(data) -> int:
    """The eval rows' length: ``data.eval_seq_len`` (e.g. twice ``seq_len``, to measure how a
    position scheme extrapolates), or ``data.seq_len`` when unset (configs saved before the
    field existed lack it)."""
    return data.get("eval_seq_len", None) or data.seq_len


def _check_data(resolved: Resolved):
    train_ds, _ = make_datasets(resolved)
    m, f = resolved.model, resolved.flags
    if train_ds.task != f.task:
        raise ConfigError(f"config.data.name={resolved.data.name!r}: its task "
                          f"{train_ds.task!r} does not match config.model.task={f.task!r}.")
    if train_ds.vocab_size > m.vocab_size:
        raise ConfigError(f"config.model.vocab_size={m.vocab_size}: dataset "
                          f"{resolved.data.name!r} needs >= {train_ds.vocab_size}.")
    d = resolved.data
    if eval_seq_len(d) < 1:
        raise ConfigError(f"config.data.eval_seq_len={d.eval_seq_len}: must be >= 1 (or unset: "
                          "data.seq_len).")
    body = getattr(m.head, "body", None)  # a model with its own geometry (Funnel's pooling)
    for name in ("seq_len", "eval_seq_len"):
        t = d.seq_len if name == "seq_len" else eval_seq_len(d)
        try:
            getattr(body, "stages", lambda t: None)(t)
        except ValueError as e:
            raise ConfigError(f"config.data.{name}={t}: {e}") from None
    max_len = getattr(m.positions, "max_len", None)  # absolute positions' table size
    longest = max(d.seq_len, eval_seq_len(d))
    if max_len is not None and longest > max_len:
        name = "seq_len" if longest == d.seq_len else "eval_seq_len"
        raise ConfigError(f"config.model.max_len={max_len}: {f.positions} positions need >= "
                          f"data.{name}={longest}; raise model.max_len or shorten the rows.")
    num_classes = getattr(train_ds, "num_classes", None)
    head_classes = getattr(m.head, "num_classes", None)
    if num_classes is not None and head_classes is not None and head_classes < num_classes:
        raise ConfigError(f"config.model.num_classes={head_classes}: dataset "
                          f"{resolved.data.name!r} has {num_classes} classes.")


def resolve(config: ml_collections.ConfigDict) -> Resolved:
    """Validates the whole config; raises :class:`ConfigError` naming the bad field."""
    for section in ("model", "data", "train"):
        if section not in config:
            raise ConfigError(f"config.{section} is missing; build configs with "
                              "tx.train.configs.experiment(...).")
    unknown = sorted(set(config.train) - set(TRAIN))
    if unknown:
        raise ConfigError(f"config.train fields {unknown} do not exist; known: {sorted(TRAIN)}")
    _check_train(config.train)
    kv_dtype(config)  # a bad name fails here, before anything is built
    load_extensions(config)
    flags = model_flags(config.model)
    resolved = Resolved(_parse(flags), config, flags)
    _check_mesh(resolved)
    _check_data(resolved)
    return resolved


def kv_dtype(config: ml_collections.ConfigDict) -> str:
    """``config.inference.kv_dtype`` (``auto`` for runs saved before the field existed),
    checked against the names ``tx.flags.kv_storage`` knows."""
    name = config.get("inference", {}).get("kv_dtype", "auto")
    try:
        flags_lib.kv_storage(name)
    except ValueError as e:
        raise ConfigError(f"config.inference.{e}") from None
    return name


def check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates ``workdir`` and checks it is writable (fails with the path and the fix)."""
    import errno
    import tempfile
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A name of its own per process (host index, pid, random suffix): two runs started
        # at once on one workdir must both get past this probe to meet at the workdir lock.
        fd, probe = tempfile.mkstemp(prefix=f".tx_write_probe{jax.process_index()}."
                                     f"{os.getpid()}.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f"disk full while writing workdir={str(path)!r}: free space or "
                              "pick another --workdir.") from None
        raise ConfigError(f"workdir={str(path)!r}: not writable ({e.strerror}); pick a "
                          "directory you can write to.") from None
    return path


# ------------------------------------------------------------------------------ comparison


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def diff(saved: dict, current: dict, ignore=RESUMABLE_CHANGES) -> list[str]:
    """Lines ``field: saved -> current`` for every field that differs (JSON-normalised)."""
    a, b = _flatten(json.loads(json.dumps(saved, default=str))), \
        _flatten(json.loads(json.dumps(current, default=str)))
    return [f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]
