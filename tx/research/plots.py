"""PNG plots with matplotlib's Agg backend (no display needed): loss curves, attention maps."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curves(runs: Mapping[str, Sequence[dict[str, Any]]], path: str | pathlib.Path,
                title: str = "", metric: str = "accuracy") -> pathlib.Path:
    """Writes :func:`loss_curves_figure` of ``runs`` (``{name: metrics.jsonl records}``) to
    ``path``."""
    plt = _pyplot()
    fig = loss_curves_figure(runs, title, metric)
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves_figure(runs: Mapping[str, Sequence[dict[str, Any]]], title: str = "",
                       metric: str = "accuracy"):
    """Two panels against the step, one color per run (named in both legends): the train loss
    (lines) and eval loss (dashed, a marker per evaluation); and the eval accuracy, titled
    ``metric`` (e.g. ``recall`` on MQAR), a marker per evaluation."""
    plt = _pyplot()
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 4.5),
                                  gridspec_kw={"width_ratios": (3, 2)})
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        scores = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1.2, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=color, ls="--", marker="o", ms=4, label=f"{name} eval")
        if scores:
            acc.plot(*zip(*scores), color=color, ls="--", marker="o", ms=4, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("train loss (lines), eval loss (markers)", fontsize=9)
    acc.set_xlabel("step")
    acc.set_ylabel(f"eval {metric}")
    acc.set_ylim(-0.02, 1.02)
    acc.grid(alpha=0.3)
    acc.set_title(f"eval {metric}", fontsize=9)
    for panel in (ax, acc):
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize=7, ncol=2 if panel is ax else 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def attention_grid(weights_lnts: Sequence[np.ndarray], path: str | pathlib.Path,
                   tokens: Sequence[str] | None = None, title: str = "") -> pathlib.Path:
    """A grid with one row per layer and one column per head of ``[T, S]`` weight maps."""
    plt = _pyplot()
    layers, heads = len(weights_lnts), max(w.shape[0] for w in weights_lnts)
    fig, axes = plt.subplots(layers, heads, figsize=(2.2 * heads, 2.2 * layers), squeeze=False)
    for l, w_nts in enumerate(weights_lnts):
        for n in range(heads):
            ax = axes[l][n]
            ax.set_xticks([])
            ax.set_yticks([])
            if n >= w_nts.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(np.asarray(w_nts[n]), cmap="viridis", vmin=0.0, interpolation="nearest")
            if l == 0:
                ax.set_title(f"head {n}", fontsize=8)
            if n == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
