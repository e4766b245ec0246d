"""The ablation runner: one base experiment, and either one field swept over a list of values
(``config.sweep``) or named variants that each change several fields (``config.variants``).

Every variant trains from the same seed on the same data order (both come from the base config),
in its own sub-directory of the workdir (so a rerun resumes unfinished variants, and reports the
figures a finished one saved in its ``figures.json``, rather than a resume's). The runner
writes ``results.csv``, ``results.md`` and ``loss_curves.png`` (train and eval loss, and the
eval accuracy, ``recall`` on MQAR, per variant) to the workdir. It prints what it will train
first, then ``variant k/n: NAME`` before each run's own lines (:func:`tx.train.loop.run`: the
model in one line, the attention backend, progress, eval metrics when computed).

With ``config.pretrain`` (an experiment config) and no ``init`` source of its own, the runner
first trains that model in ``workdir/pretrain`` and starts every variant from its weights
(``init.workdir``): the uptraining comparisons of ``configs/ablation.py:uptrain``.

With ``config.tasks`` (named experiment configs) every variant runs on every task (or each
task runs its own ``variants``: ``configs/ablation.py:classics``), each task
in ``workdir/<task>`` with its own results; the workdir gets ``results.md`` and one JSON line
``results.json`` comparing the variants across tasks. With ``config.crossover``
(:func:`tx.research.crossover.section`) each variant's ``model`` changes also apply to that
section's speed model, timed against sequence length (``tx.research.crossover``):
``configs/ablation.py:linear``.
"""

from __future__ import annotations

import copy
import csv
import json
import pathlib
import re
from typing import Any, Callable

import ml_collections
import numpy as np

from tx.research import crossover as crossover_lib
from tx.research import plots
from tx.train import configs as configs_lib
from tx.train import loop
from tx.train import pretrained as pretrained_lib
from tx.train.configs import ConfigError
from tx.train.metrics import read_jsonl

COLUMNS = (("variant", "variant", "{}"), ("first_loss", "step-1 loss", "{:.4f}"),
           ("loss", "train loss", "{:.4f}"),
           ("eval_loss", "eval loss", "{:.4f}"), ("eval_accuracy", "eval acc", "{:.3f}"),
           ("tokens_per_second", "tokens/s", "{:,.0f}"), ("params", "params", "{:,}"),
           ("kv_bytes_per_token", "KV bytes/token", "{:,}"), ("wall_seconds", "wall s", "{:.1f}"))


# The runner's own sections: never part of a variant's experiment config.
RUNNER_SECTIONS = ("sweep", "variants", "pretrain", "tasks", "crossover")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"config.sweep.field={field!r}: no such config field; use a dotted "
                              "path such as 'model.attention' or 'train.learning_rate'.")
        node = node[part]
    return node


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _field_type(config, field: str) -> type:
    """The declared type of a field (placeholders such as ``num_kv_heads`` included)."""
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    return node.get_ref(leaf).get_type()


def _parse(text: str, kind: type, field: str):
    """One sweep value from text, as the field's type."""
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind in (int, float):
            return kind(text)
        if kind in (tuple, list):
            return tuple(p for p in text.split(",") if p)
        return text
    except ValueError:
        raise ConfigError(f"config.sweep.choices: {text!r} is not a valid "
                          f"{kind.__name__} for {field}.") from None


def sweep_values(config) -> list:
    """The typed values of ``config.sweep``; ``values`` is a comma-separated string (use ';'
    to separate tuple values, e.g. ``local,full;full``) or a list."""
    field, values = config.sweep.field, config.sweep.choices
    _get(config, field)  # fails naming the field when it does not exist
    if isinstance(values, str):
        values = [v.strip() for v in values.split(";" if ";" in values else ",") if v.strip()]
        values = [_parse(v, _field_type(config, field), field) for v in values]
    if not values:
        raise ConfigError("config.sweep.choices is empty; give at least one value.")
    return list(values)


def variant_configs(config) -> dict[str, ml_collections.ConfigDict]:
    """``{name: experiment config}``, one per sweep value or named variant, validated before
    anything runs."""
    if "variants" in config:
        return _named_variants(config)
    out = {}
    for value in sweep_values(config):
        variant = _bare(config)
        _set(variant, config.sweep.field, value)
        configs_lib.resolve(pretrained_lib.with_source_model(variant, None))
        out[_value_name(value)] = variant
    return out


def _value_name(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+,=-]", "_", text)


def _bare(config) -> ml_collections.ConfigDict:
    """``config`` without the runner's own sections (keeps field types, placeholders too)."""
    variant = copy.deepcopy(config)
    with variant.unlocked():
        for name in RUNNER_SECTIONS:
            if name in variant:
                del variant[name]
    return variant


def _update(node: ml_collections.ConfigDict, changes, where: str) -> None:
    for key, value in changes.items():
        if key not in node:
            raise ConfigError(f"config.{where}.{key}: no such config field.")
        if isinstance(value, ml_collections.ConfigDict):
            _update(node[key], value, f"{where}.{key}")
        else:
            node[key] = value


def _named_variants(config) -> dict[str, ml_collections.ConfigDict]:
    out = {}
    for name, changes in config.variants.items():
        variant = _bare(config)
        _update(variant, changes, f"variants.{name}")
        if pretrained_lib.requested(variant):
            configs_lib.resolve(pretrained_lib.with_source_model(variant, None))
        out[name] = variant
    if not out:
        raise ConfigError("config.variants is empty; name at least one variant.")
    return out


def _pretrained(config, workdir: pathlib.Path, print_fn) -> ml_collections.ConfigDict:
    """Trains ``config.pretrain`` (once; a rerun resumes or skips it) when the config has no
    ``init`` source, and points every variant's ``init.workdir`` at it."""
    if "pretrain" not in config or pretrained_lib.requested(config):
        return config
    if print_fn:
        print_fn(f"pretraining the model every variant starts from, in {workdir / 'pretrain'}")
    loop.run(config.pretrain, workdir / "pretrain", print_fn=print_fn)
    config = copy.deepcopy(config)
    config.init.workdir = str(workdir / "pretrain")
    return config


FIGURES = "figures.json"  # a finished variant's summary, in its directory


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    """NumPy scalars as Python numbers: the figures read back from JSON format alike."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in summary.items()}


def save_figures(summary: dict[str, Any], variant, workdir: pathlib.Path) -> None:
    """Keeps a variant's figures (``loop.run``'s summary) with the config that made them, so a
    rerun of the ablation reports them instead of a resume's (which trains no step: no
    tokens/s, and its own wall time). Only a run that trained steps is kept; written whole
    (a temporary file renamed) by the main process."""
    if not loop.is_main_process() or not np.isfinite(summary.get("tokens_per_second", np.nan)):
        return
    tmp = workdir / f".{FIGURES}.tmp"
    tmp.write_text(json.dumps({"summary": summary, "config": variant.to_dict()},
                              default=str) + "\n")
    tmp.replace(workdir / FIGURES)


def finished_figures(variant, workdir: pathlib.Path) -> dict[str, Any] | None:
    """The saved figures of a variant that already finished ``train.steps`` with this config
    (fields that do not change the trajectory may differ) and still has that checkpoint;
    ``None`` when it must (re)run."""
    try:
        saved = json.loads((workdir / FIGURES).read_text())
        summary, config = saved["summary"], saved["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    steps = variant.train.steps
    if summary.get("steps") != steps or not (workdir / "checkpoints" / str(steps)).is_dir():
        return None
    if configs_lib.diff(config, variant.to_dict()):
        return None
    return summary


def _cell(fmt: str, value) -> str:
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], field: str) -> str:
    """A Markdown table of the results."""
    heads = [f"{title} ({field})" if key == "variant" and field != "variant" else title
             for key, title, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(_cell(fmt, r.get(key)) for key, _, fmt in COLUMNS) + " |"
              for r in rows]
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], workdir: pathlib.Path, field: str) -> None:
    with (workdir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, [key for key, _, _ in COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (workdir / "results.md").write_text(f"# Ablation over `{field}`\n\n{table(rows, field)}\n")
    metric = next((r["accuracy_name"] for r in rows if r.get("accuracy_name")), "accuracy")
    plots.loss_curves({r["variant"]: read_jsonl(workdir / r["variant"] / "metrics.jsonl")
                       for r in rows}, workdir / "loss_curves.png", title=f"sweep: {field}",
                      metric=metric)


def variant_models(config, model: ml_collections.ConfigDict
                   ) -> dict[str, ml_collections.ConfigDict]:
    """``{name: model section}``: each variant's changes to ``config.model`` (named variants'
    ``model`` changes, or a ``model.*`` sweep field) applied to ``model``; a variant that
    changes nothing in the model gets ``model`` as it is."""
    out = {}
    if "variants" in config:
        for name, changes in config.variants.items():
            holder = ml_collections.ConfigDict({"model": copy.deepcopy(model)})
            _update(holder, {k: v for k, v in changes.items() if k == "model"},
                    f"variants.{name}")
            out[name] = holder.model
        return out
    for value in sweep_values(config):
        holder = ml_collections.ConfigDict({"model": copy.deepcopy(model)})
        if config.sweep.field.startswith("model."):
            _set(holder, config.sweep.field, value)
        out[_value_name(value)] = holder.model
    return out


def _task_configs(config) -> dict[str, ml_collections.ConfigDict]:
    """``{task: config}``: each of ``config.tasks`` with the runner's sections (variants or
    sweep); without tasks, ``{"": config}``."""
    if "tasks" not in config:
        return {"": config}
    if not config.tasks:
        raise ConfigError("config.tasks is empty; name at least one experiment config.")
    out = {}
    for name, task in config.tasks.items():
        task = copy.deepcopy(task)
        own = "variants" in task or "sweep" in task  # a task may bring its own variants
        with task.unlocked():
            for section in ("sweep", "variants", "pretrain"):
                if section in config and not (own and section != "pretrain"):
                    task[section] = copy.deepcopy(config[section])
        if "variants" not in task and "sweep" not in task:
            raise ConfigError(f"config.tasks.{name} has no variants: give config.variants "
                              f"(every task runs them) or config.tasks.{name}.variants.")
        out[name] = task
    return out


def _crossover_models(config) -> dict[str, Any]:
    """The variants' speed-model flags, validated (before anything trains)."""
    section = config.crossover
    models = {name: crossover_lib.variant_flags(model, section.lengths)
              for name, model in variant_models(config, section.model).items()}
    crossover_lib.check(section, models)
    return models


def _field(config) -> str:
    return config.sweep.field if "sweep" in config else "variant"


def _ablate_one(config, workdir: pathlib.Path, print_fn, variants=None, title: str = ""
                ) -> list[dict[str, Any]]:
    """Trains the variants of one experiment (``variants``: already built, or None to build
    them after the pretraining run) and writes its results to ``workdir``."""
    field = _field(config)
    workdir = configs_lib.check_workdir(workdir)
    config = _pretrained(config, workdir, print_fn)
    rows = []
    variants = variants or variant_configs(config)
    for k, (name, variant) in enumerate(variants.items(), 1):
        if print_fn:
            where = "" if field == "variant" else f" ({field}={name})"
            print_fn(f"{title}variant {k}/{len(variants)}: {name}{where}")
        summary = finished_figures(variant, workdir / name)
        if summary is None:
            summary = _plain(loop.run(variant, workdir / name, print_fn=print_fn))
            save_figures(summary, variant, workdir / name)
        elif print_fn:
            print_fn(f"finished at step {summary['steps']} in {workdir / name}: its saved "
                     f"figures ({FIGURES}) are reported")
        rows.append({"variant": name, **summary})
        write_results(rows, workdir, field)
    if print_fn:
        print_fn(table(rows, field))
    return rows


TASK_COLUMNS = (("eval_loss", "eval loss", "{:.4f}"), ("eval_accuracy", "eval acc", "{:.3f}"),
                ("tokens_per_second", "train tok/s", "{:,.0f}"))


def task_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per variant, the columns of every task side by side."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["task"], r["variant"]): r for r in rows}
    heads = ["variant"] + [f"{t} {title}" for t in tasks for _, title, _ in TASK_COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name in names:
        cells = [_cell(fmt, cell.get((t, name), {}).get(key))
                 for t in tasks for key, _, fmt in TASK_COLUMNS]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def _shared_variants(rows) -> bool:
    """Whether every task ran the same variants (then one table sets them side by side)."""
    names = {}
    for r in rows:
        names.setdefault(r["task"], set()).add(r["variant"])
    return len({frozenset(v) for v in names.values()}) == 1


def _summary(rows, speed, workdir: pathlib.Path, field: str, print_fn) -> None:
    """``results.md`` and the one-line ``results.json`` of a multi-task or crossover run."""
    text = "# Ablation\n\n"
    if rows and "task" in rows[0] and _shared_variants(rows):
        text += "## Tasks\n\n" + task_table(rows) + "\n\n"
    elif rows and "task" in rows[0]:  # each task its own variants: a table per task
        for task in dict.fromkeys(r["task"] for r in rows):
            own = [r for r in rows if r["task"] == task]
            text += f"## {task}\n\n" + table(own, field) + \
                f"\n\n![{task}]({task}/loss_curves.png)\n\n"
    elif rows:
        text += f"## Over `{field}`\n\n" + table(rows, field) + "\n\n"
    if speed is not None:
        text += "## Speed against sequence length\n\n" + \
            (workdir / "crossover.md").read_text() + "\n![crossover](crossover.png)\n"
    (workdir / "results.md").write_text(text)
    # The cache sizes come from the crossover (kv_cache_bytes knows windows and FAVOR+ states).
    keep = ("task", "variant") + tuple(k for k, _, _ in COLUMNS[1:]
                                       if k != "kv_bytes_per_token")
    line = json.dumps({"tasks": [{k: r.get(k) for k in keep} for r in rows],
                       **({} if speed is None else speed)})
    (workdir / "results.json").write_text(line + "\n")
    if print_fn:
        print_fn(text)
        print_fn(line)


def plan(config, tasks: dict, built: dict, workdir: pathlib.Path) -> str:
    """The runner's first line: what it will train, where, and that each variant builds its
    model and compiles its train step in turn."""
    parts = []
    for name, task in tasks.items():
        if name in built:
            names = list(built[name])
        else:
            names = list(task.variants) if "variants" in task else \
                [_value_name(v) for v in sweep_values(task)]
        what = f"{len(names)} variants" + (
            "" if "variants" in task else f" of {task.sweep.field}")
        first = (f" after {task.pretrain.train.steps} pretraining steps"
                 if "pretrain" in task and not pretrained_lib.requested(task) else "")
        parts.append(f"{name + ': ' if name else ''}{what} ({', '.join(names)}) on "
                     f"{task.data.name}, {task.train.steps} steps each{first}")
    speed = ", then the crossover speed sweep" if "crossover" in config else ""
    return (f"ablation: {'; '.join(parts)}{speed}, in {workdir}; each variant builds its "
            "model and compiles its train step first")


def ablate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
           print_fn: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Runs every variant of ``config.sweep`` or ``config.variants`` (on every task of
    ``config.tasks``), then the ``config.crossover`` speed sweep; returns one result row per
    variant (and task)."""
    if "sweep" not in config and "variants" not in config and "tasks" not in config:
        raise ConfigError("config.sweep is missing; give sweep.field and sweep.choices "
                          "(see configs/ablation.py), or named config.variants.")
    tasks, built = _task_configs(config), {}
    for name, task in tasks.items():  # everything fails before anything trains
        if "pretrain" not in task:
            built[name] = variant_configs(task)
        elif not pretrained_lib.requested(task):
            configs_lib.resolve(task.pretrain)  # its variants are built after pretraining
    speed_models = _crossover_models(config) if "crossover" in config else None
    workdir = configs_lib.check_workdir(workdir)
    if print_fn:
        print_fn(plan(config, tasks, built, workdir))
    rows = []
    for name, task in tasks.items():
        rows += [{"task": name, **r} if name else r for r in
                 _ablate_one(task, workdir / name if name else workdir, print_fn,
                             built.get(name), f"{name}: " if name else "")]
    speed = None
    if speed_models is not None:
        if print_fn:
            print_fn("crossover: timing each variant's speed against sequence length")
        speed = crossover_lib.run(speed_models, config.crossover, workdir, print_fn=print_fn)
    if "tasks" in config or speed is not None:
        _summary(rows, speed, workdir, _field(config), print_fn)
    return rows
