"""The ablation runner: one base experiment, one field swept over a list of values.

Every variant trains from the same seed on the same data order (both come from the base config),
in its own sub-directory of the workdir (so a rerun resumes or skips finished variants). The
runner writes ``results.csv``, ``results.md`` and ``loss_curves.png`` to the workdir.
"""

from __future__ import annotations

import copy
import csv
import pathlib
import re
from typing import Any, Callable

import ml_collections

from tx.train import configs as configs_lib
from tx.train import loop, plots
from tx.train.configs import ConfigError
from tx.train.metrics import read_jsonl

COLUMNS = (("variant", "variant", "{}"), ("loss", "train loss", "{:.4f}"),
           ("eval_loss", "eval loss", "{:.4f}"), ("eval_accuracy", "eval acc", "{:.3f}"),
           ("tokens_per_second", "tokens/s", "{:,.0f}"), ("params", "params", "{:,}"),
           ("kv_bytes_per_token", "KV bytes/token", "{:,}"), ("wall_seconds", "wall s", "{:.1f}"))


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
    """``{name: experiment config}``, one per sweep value, validated before anything runs."""
    out = {}
    for value in sweep_values(config):
        variant = copy.deepcopy(config)  # keeps field types (placeholders included)
        with variant.unlocked():
            del variant["sweep"]
        _set(variant, config.sweep.field, value)
        configs_lib.resolve(variant)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        out[re.sub(r"[^A-Za-z0-9_.+,=-]", "_", text)] = variant
    return out


def _cell(fmt: str, value) -> str:
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], field: str) -> str:
    """A Markdown table of the results."""
    heads = [f"{title} ({field})" if key == "variant" else title for key, title, _ in COLUMNS]
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
    plots.loss_curves({r["variant"]: read_jsonl(workdir / r["variant"] / "metrics.jsonl")
                       for r in rows}, workdir / "loss_curves.png", title=f"sweep: {field}")


def ablate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
           print_fn: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Runs every variant of ``config.sweep`` and returns one result row per variant."""
    if "sweep" not in config:
        raise ConfigError("config.sweep is missing; give sweep.field and sweep.choices "
                          "(see configs/ablation.py).")
    workdir = configs_lib.check_workdir(workdir)
    variants = variant_configs(config)
    rows = []
    for name, variant in variants.items():
        if print_fn:
            print_fn(f"== {config.sweep.field}={name}")
        summary = loop.run(variant, workdir / name, print_fn=print_fn)
        rows.append({"variant": name, **summary})
        write_results(rows, workdir, config.sweep.field)
    if print_fn:
        print_fn(table(rows, config.sweep.field))
    return rows
