"""``--print_config``: what a config runs, before anything runs.

:func:`render` prints the value tree each model of a config resolves to (the
:class:`tx.config.ModelConfig` of ``config.model``; for an ablation, the base and what every
variant changes) and then every ``--config.*`` field: its dotted path, current value and a
one-line doc. Model fields are documented by :func:`tx.flags.fields` (each registered value
declares its own); the other sections by :data:`DOCS` here. A field without a doc prints an
empty one.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import types
from collections.abc import Iterator
from typing import Any

import ml_collections

from tx import flags as flags_lib
from tx.train import configs as configs_lib

# One line per field of the sections outside ``model``; a key matches a field's dotted path or
# its tail (``train.steps`` documents ``pretrain.train.steps`` and ``tasks.lm.train.steps``).
DOCS = {
    # train (tx.train.configs.TRAIN)
    "train.steps": "optimizer updates (where the run stops)",
    "train.schedule_steps": "learning-rate schedule length; 0: train.steps at the run's start",
    "train.batch_size": "examples per update (split into grad_accum micro-batches)",
    "train.grad_accum": "micro-batches per update (gradient accumulation); divides batch_size",
    "train.learning_rate": "peak AdamW learning rate, reached after warmup_steps",
    "train.min_learning_rate_ratio": "cosine decay ends at learning_rate * this",
    "train.warmup_steps": "linear warm-up updates to learning_rate; -1: min(20, schedule // 10)",
    "train.weight_decay": "AdamW decoupled weight decay",
    "train.b1": "AdamW decay of the first moment (the gradient's running mean)",
    "train.b2": "AdamW decay of the second moment (the squared gradient's running mean)",
    "train.clip_norm": "global-norm gradient clipping; 0 disables",
    "train.max_nonfinite": "stop after this many non-finite updates in a row (each is skipped)",
    "train.seed": "model init and data order",
    "train.remat": "recompute each block's activations in the backward pass (less memory)",
    "train.log_every": "updates between logged training metrics",
    "train.eval_every": "updates between evaluations on the eval split",
    "train.eval_batches": "batches per evaluation",
    "train.checkpoint_every": "updates between checkpoints",
    "train.keep": "latest checkpoints kept (the latest is never deleted)",
    "train.keep_best": "also keep this many best-by-eval-loss checkpoints (0: off)",
    "train.async_checkpoints": "write checkpoints in the background while training goes on",
    # mesh (tx.parallel.MeshConfig)
    "mesh.data": "data-parallel degree (devices holding whole replicas)",
    "mesh.fsdp": "fully sharded data-parallel degree (parameters split across devices)",
    "mesh.tensor": "tensor-parallel degree (heads and MLP width split across devices)",
    "mesh.context": "context-parallel degree (the sequence split across devices)",
    "mesh.context_attention": "attention on a split sequence: ring or all_to_all (Ulysses)",
    # data (tx.data.make_dataset)
    "data.name": "the tx.data dataset (built-in or registered with register_dataset)",
    "data.seq_len": "tokens per example row",
    "data.eval_seq_len": "tokens per eval row (unset: seq_len); 2x seq_len measures extrapolation",
    "data.options.paths": "your text or record files (comma-separated; globs and directories)",
    "data.options.eval_paths": "files of the eval split (default: held out from paths)",
    "data.options.path": "a local Hugging Face dataset directory (datasets.save_to_disk)",
    "data.options.column": "the text column of the Hugging Face dataset",
    "data.options.train_split": "the Hugging Face dataset's training split",
    "data.options.eval_split": "the Hugging Face dataset's eval split",
    "data.options.tokenizer": "a tokenizer.json (or its directory) to tokenise text with",
    "data.options.record_format": "what a record holds: bytes (UTF-8 text) or int32 token ids",
    "data.options.vocab_size": "the token ids' vocabulary size (record_format=int32)",
    "data.options.docs_per_row": "documents drawn per packed row (on average)",
    "data.options.strategy": "how documents are packed into rows",
    "data.options.max_bytes": "read at most this many bytes of text",
    "data.options.eval_fraction": "share of the text held out as the eval split",
    "data.options.num_kv_pairs": "MQAR: key-value pairs opening each row",
    "data.options.num_queries": "MQAR: queries per row (default: as many as fit)",
    "data.options.num_keys": "MQAR: distinct key tokens",
    "data.options.num_values": "MQAR: distinct value tokens",
    "data.options.num_symbols": "seq2seq tasks: distinct symbols",
    "data.options.min_len": "seq2seq tasks: shortest source sequence",
    "data.options.max_len": "seq2seq tasks: longest source sequence",
    # init (tx.train.pretrained): pretrained starts
    "init.hf": "a Hugging Face checkpoint directory whose weights the run starts from",
    "init.workdir": "a tx run's workdir whose latest weights the run starts from",
    "init.swap.num_kv_heads": "fewer K/V heads for the loaded weights (0: no swap)",
    "init.swap.kv_init": "how the swapped K/V heads start: mean (pool each group) or random",
    "init.swap.layer_pattern": "a per-layer attention pattern for the loaded weights",
    "init.swap.window": "the local window of the swapped pattern (0: no swap)",
    # inference
    "inference.kv_dtype": "KV-cache storage when decoding: auto, int8, int4, int4_per_token",
    # ablations (tx.research.ablation)
    "sweep.field": "the dotted config field an ablation sweeps",
    "sweep.choices": "the swept values, comma-separated (';' when values hold commas)",
    "crossover.lengths": "sequence lengths the speed comparison times",
    "crossover.train_tokens": "tokens per timed training pass",
    "crossover.decode_tokens": "decode steps per timed call",
    "crossover.repeats": "timed calls per figure (median)",
    "crossover.max_seconds": "fewer timed calls once this much time is spent",
    "crossover.versus": "the two variants whose crossover length is reported",
    "extensions": "Python files imported first: they register the names this config uses",
}

_FIRST = ("model", "data", "train", "mesh", "init", "inference")


def docs() -> dict[str, str]:
    """Every known doc by dotted path: :data:`DOCS` and ``model.<field>`` from
    :func:`tx.flags.fields`."""
    out = dict(DOCS)
    fields = getattr(flags_lib, "fields", None)
    for name, field in (fields() if fields is not None else {}).items():
        out[f"model.{name}"] = (getattr(field, "doc", "") or "").split("\n")[0]
    return out


def doc(path: str, table: dict[str, str] | None = None) -> str:
    """The doc of ``path`` (``tasks.lm.train.steps`` falls back to ``train.steps``); ``""``
    when none is known."""
    table = docs() if table is None else table
    parts = path.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in table:
            return table[".".join(parts[i:])]
    return ""


def fields(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf field, main sections first."""
    keys = list(config.keys())
    if not prefix:
        keys = [k for k in _FIRST if k in keys] + [k for k in keys if k not in _FIRST]
    for key in keys:
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value.to_dict() if isinstance(
                value, ml_collections.ConfigDict) else value


# ------------------------------------------------------------------------------ value trees


def _generated_repr(value) -> bool:
    """Whether ``value``'s class prints with the repr dataclasses generate (not its own)."""
    fn = getattr(type(value).__repr__, "__wrapped__", type(value).__repr__)
    return "__create_fn__" in getattr(fn, "__qualname__", "")


def _short(value) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return getattr(value, "__qualname__", None) or value.__name__
    if isinstance(value, functools.partial):
        args = [_short(a) for a in value.args] + [f"{k}={_short(v)}"
                                                  for k, v in value.keywords.items()]
        return f"partial({', '.join([_short(value.func), *args])})"
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        inner = ", ".join(_short(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and \
            _generated_repr(value):
        items = [f"{f.name}={_short(getattr(value, f.name))}"
                 for f in dataclasses.fields(value) if f.repr]
        return f"{type(value).__name__}({', '.join(items)})"
    return repr(value)


def format_value(value, indent: int = 0, width: int = 100) -> str:
    """``value`` as readable text: dataclasses as ``Name(field=...)``, one line when it fits,
    else one field a line; functions and types by name."""
    one = _short(value)
    if indent + len(one) <= width:
        return one
    pad = " " * (indent + 4)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and \
            _generated_repr(value):
        items = [f"{pad}{f.name}={format_value(getattr(value, f.name), indent + 4, width)},"
                 for f in dataclasses.fields(value) if f.repr]
        return "\n".join([f"{type(value).__name__}(", *items, " " * indent + ")"])
    if isinstance(value, tuple) and not hasattr(value, "_fields") and value:
        items = [f"{pad}{format_value(v, indent + 4, width)}," for v in value]
        return "\n".join(["(", *items, " " * indent + ")"])
    return one


def value_tree(model, width: int = 100) -> list[str]:
    """One ``field = value`` entry per top-level field of a value tree."""
    if not dataclasses.is_dataclass(model):
        return [format_value(model, 2, width)]
    return [f"  {f.name} = {format_value(getattr(model, f.name), 2, width)}"
            for f in dataclasses.fields(model)]


def _changes(model, base, prefix: str = "") -> list[str]:
    """``field = value`` for each field of ``model`` that differs from ``base``, down to the
    innermost dataclass field that differs (``attention.masks = ...``)."""
    if not (dataclasses.is_dataclass(model) and type(model) is type(base)) or \
            not _generated_repr(model):
        return [f"  {prefix[:-1]} = {format_value(model, 2)}"] if prefix else value_tree(model)
    out = []
    for f in dataclasses.fields(model):
        mine, theirs = getattr(model, f.name), getattr(base, f.name)
        if mine != theirs:
            out += _changes(mine, theirs, f"{prefix}{f.name}.")
    return out


# ------------------------------------------------------------------------------ resolution


def _resolved_model(config: ml_collections.ConfigDict):
    from tx.train import pretrained as pretrained_lib
    if "init" in config:  # a pretrained start's model comes from its source
        config = pretrained_lib.with_source_model(config, None)
    return configs_lib.resolve(config).model


def models(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{title: value tree}``: the model of ``config``; for an ablation (``sweep`` or
    ``variants``, per task of ``tasks``) the base's and every variant's, in run order."""
    from tx.research import ablation  # only ablation configs need the runner
    from tx.train import pretrained as pretrained_lib
    ablating = "sweep" in config or "variants" in config
    tasks = dict(config.tasks.items()) if "tasks" in config else {"": config}
    out = {}
    for name, task in tasks.items():
        where = f"tasks.{name}." if name else ""
        if "pretrain" in task and not pretrained_lib.requested(task):
            # The variants start from the weights of a run the runner trains first.
            out[f"{where}pretrain.model"] = _resolved_model(task.pretrain)
            continue
        if "model" in task:
            out[f"{where}model"] = _resolved_model(task)
        if not ablating or "pretrain" in task:
            continue
        if name:  # the runner gives each task the sweep or variants
            task = copy.deepcopy(task)
            with task.unlocked():
                for section in ("sweep", "variants"):
                    if section in config:
                        task[section] = copy.deepcopy(config[section])
        field = config.sweep.field if "sweep" in config else "variant"
        for label, variant in ablation.variant_configs(task).items():
            out[f"{where}{field}={label}"] = _resolved_model(variant)
    return out


def _backends(model) -> str:
    """The backend order attention tries here (an empty implementation: the device's)."""
    from tx.attention import registry  # noqa: PLC0415  (jax only when printing)
    order = model.attention.implementation
    names = [getattr(b, "name", b) for b in registry.resolve(order)]
    where = "" if order else " (the device's order, tx.attention.defaults())"
    return f"  attention backends here: {', '.join(names)}{where}"


def _shapes(model, config) -> list[str]:
    """The attention shapes at ``data.seq_len`` of a model whose layers see shortened lengths
    (a body with ``attention_shapes``: Funnel's pooled blocks)."""
    shapes = getattr(getattr(model.head, "body", None), "attention_shapes", None)
    seq_len = config.get("data", {}).get("seq_len") if hasattr(config, "get") else None
    if not callable(shapes) or not isinstance(seq_len, int):
        return []
    try:
        found = shapes(seq_len)
    except ValueError as e:  # the run refuses it too; say why here
        return [f"  attention shapes at data.seq_len={seq_len}: {e}"]
    return [f"  attention shapes at data.seq_len={seq_len}: " +
            "; ".join(f"{k} ({n} layer{'s' * (n != 1)})" for k, n in found.items())]


def render(config: ml_collections.ConfigDict, resolved: dict[str, Any] | None = None,
           width: int = 100) -> str:
    """The text of ``--print_config``: the value trees (``resolved``, default
    :func:`models`) and then every field as ``--config.<path>=<value>  # <doc>``."""
    resolved = models(config) if resolved is None else resolved
    lines, base = [], None
    for title, model in resolved.items():
        if base is not None and "=" in title:  # an ablation variant: what it changes
            changes = _changes(model, base)
            lines += [f"{title} (changes from the base model):", *(changes or ["  nothing"]),
                      ""]
            continue
        lines += [f"{title} resolves to:", *value_tree(model, width), _backends(model),
                  *_shapes(model, config), ""]
        base = model
    table = docs()
    rows = [(f"--config.{path}={value!r}", doc(path, table)) for path, value in fields(config)]
    column = min(max((len(r) for r, _ in rows), default=0), 56)
    lines.append("fields (--config.<field>=<value>):")
    lines += [f"  {flag.ljust(column)}  # {text}" if text else f"  {flag}" for flag, text in rows]
    return "\n".join(lines)
