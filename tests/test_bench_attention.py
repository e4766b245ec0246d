"""Runs experiments/bench_attention.py's tiny matrix in-process (interpret mode on CPU)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import pytest

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
