"""Runs experiments/bench_attention.py's tiny matrix in-process (interpret mode on CPU), and
its score-modifier suite as a script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from tx.experiments import _score_mod_bench

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    if "bench_attention" in sys.modules:  # its absl flags may be defined once per process
        return sys.modules["bench_attention"]
    spec = importlib.util.spec_from_file_location("bench_attention", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_tiny_matrix_emits_parsable_small_error_rows(bench):
    lines = []
    rows = bench.run(bench.tiny_cells(), iters=1, interpret=jax.default_backend() != "gpu",
                     emit=lines.append)
    parsed = [json.loads(line) for line in lines]
    assert parsed == rows and len(rows) == 2 * len(bench.IMPLS) * len(bench.tiny_cells())
    for row in parsed:
        assert row["device"] and row["jax_version"] == jax.__version__
        assert row["pass"] in ("fwd", "fwd+bwd") and row["status"] in ("ok", "n/a")
        if row["status"] == "n/a":
            assert row["reason"], row
        else:
            assert row["ms"] > 0 and row["tflops"] > 0
        if row["status"] == "ok" and row["pass"] == "fwd":
            assert row["max_err"] < 1e-4, row  # fp32 tiny cells
    ours = [r for r in parsed if r["impl"] == "tx_pallas"]
    assert ours and all(r["status"] == "ok" for r in ours)
    local = next(r for r in ours if "Local" in r["mask"])
    assert 0 < local["density"] < 0.5
    table = bench.format_table(rows)
    assert "tx_pallas" in table and "n/a" in table or jax.default_backend() == "gpu"


def test_score_mod_suite_rows_in_json_and_table(tmp_path):
    json_out = tmp_path / "rows.jsonl"
    strict = {"JAX_NUMPY_RANK_PROMOTION": "raise", "JAX_NUMPY_DTYPE_PROMOTION": "strict"}
    done = subprocess.run([sys.executable, str(_PATH), "--tiny", "--suites=score_mods",
                           f"--json_out={json_out}"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **strict})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in done.stdout.splitlines() if line[:1] == "{"]
    names = _score_mod_bench.NAMES
    assert len(rows) == 2 + 2 * 2 * len(names)  # baseline; per modifier kernel and xla x 2
    for row in rows:
        assert row["suite"] == "score_mods" and row["status"] == "ok", \
            (row["score_mod"], row["impl"], row["pass"], row.get("reason"))
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        if row["pass"] == "fwd":
            assert row["max_err"] < 1e-4, row  # fp32 tiny cell, against the modified reference
        if row["score_mod"] != "none":
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
    via = {(r["score_mod"], r["impl"]): r["via"] for r in rows}
    assert via.pop(("none", "tx_pallas")) == "none"
    assert via == {**{(n, "tx_pallas"): "score_mod" for n in names},
                   **{(n, "xla"): "dense_bias" if n in ("alibi", "t5_32") else "score_mod"
                      for n in names}}
    table = [line for line in done.stdout.splitlines() if line.startswith("B=")]
    for name in names:
        for impl in ("tx_pallas", "xla"):
            mine = [line.split() for line in table if f" {name} " in line and f" {impl} " in line]
            passes = [next(i for i, c in enumerate(cols) if c in ("fwd", "fwd+bwd"))
                      for cols in mine]
            assert len(mine) == 2, (name, impl, mine)
            assert all(float(cols[i + 1]) > 0 for cols, i in zip(mine, passes)), mine
    assert "x base" in done.stdout and "TFLOP/s" not in done.stdout  # no peers table
    assert ("interpret mode" in done.stdout) == (jax.default_backend() != "gpu")
