"""The GPU run (``benchmarks/gpu_run.sh``) cannot rot: its CPU dry run (interpret mode, tiny
shapes) runs every section's code here, and writes the files the device tool brings back.
The summary's targets, which only a GPU run's cells reach, are checked on made-up rows."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ["calibrate", "kernel_tests", "flash", "paged", "e2e", "score_mods", "crossover"]
FILES = ["env.txt", "kernel_tests.log", "results.jsonl", "run.log", "summary.md"]

_spec = importlib.util.spec_from_file_location("gpu_run_summarize",
                                               ROOT / "benchmarks" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, proc.stdout


def _section(rows, name):
    return [r for r in rows if r.get("section") == name and r.get("event") != "section_end"]


def test_files_fit_what_the_device_tool_returns(dry_run):
    out, _, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == FILES  # at most 8, no folders
    for path in out.iterdir():
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name) and path.stat().st_size < 16 << 20


def test_every_section_ran_in_order_within_its_budget(dry_run):
    _, rows, stdout = dry_run
    ends = [r for r in rows if r.get("event") == "section_end"]
    assert [r["section"] for r in ends] == SECTIONS
    assert all(r["rc"] == 0 and not r["timed_out"] for r in ends), ends
    assert rows[0]["event"] == "run_start" and rows[0]["dry_run"] is True
    assert not [r for r in rows if r.get("status") == "skipped"]
    assert "gpu_run.sh: done" in stdout


def test_calibration_and_kernel_tests(dry_run):
    _, rows, _ = dry_run
    (cal,) = _section(rows, "calibrate")
    assert cal["matmul_tflops"] > 0 and cal["copy_gb_per_s_ref"] > 0 and cal["jax"]
    tests = _section(rows, "kernel_tests")
    assert [r["outcome"] for r in tests if "nodeid" in r] == ["passed"] * 3
    assert next(r for r in tests if r.get("event") == "finished")["exitstatus"] == 0


def test_flash_rows_are_checked_against_the_reference(dry_run):
    _, rows, _ = dry_run
    flash = _section(rows, "flash")
    for kind in ("causal", "local", "packed"):
        for impl in ("tx_pallas", "jax_xla"):
            got = [r for r in flash if r["kind"] == kind and r["impl"] == impl]
            assert {r["pass"] for r in got} == {"fwd", "fwd+bwd"}, (kind, impl)
            assert all(r["status"] == "ok" and r["check"] == "ok" and r["tflops"] >= 0
                       for r in got), got
    assert all(r["status"] == "n/a" for r in flash if r["impl"] == "cudnn")
    assert [r["check"] for r in flash if r["impl"] == "jax_mha" and r["status"] == "ok"]


def test_paged_rows_cover_both_tables_and_the_peers(dry_run):
    _, rows, _ = dry_run
    paged = _section(rows, "paged")
    ours = [r for r in paged if r["impl"] == "tx_pallas"]
    assert {r["table"] for r in ours} == {"shuffled", "identity"}
    assert all(r["status"] == "ok" and r["check"] == "ok" and r["copy_pct"] > 0
               for r in paged if r["impl"] in ("tx_pallas", "xla", "jax_pallas")), paged
    assert {r["num_kv_heads"] for r in ours} == {2, 8}


def test_end_to_end_orders_train(dry_run):
    _, rows, _ = dry_run
    e2e = _section(rows, "e2e")
    assert [r["order"] for r in e2e] == ["default", "xla", "cudnn,xla"]
    for r in e2e:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["served"] and r["loss"] > 0
    assert e2e[1]["served"] == {"attention": {"xla": 1}}


def test_score_mods_and_crossover(dry_run):
    _, rows, _ = dry_run
    mods = _section(rows, "score_mods")
    assert {r["score_mod"] for r in mods} == {"none", "alibi", "softcap50"}
    assert all(r["status"] == "ok" for r in mods), mods
    cross = _section(rows, "crossover")
    assert {r["variant"] for r in cross if "variant" in r} == {"favor", "full"}
    assert any("crossover" in r for r in cross)


def test_tables_json_lines_and_summary(dry_run):
    out, rows, _ = dry_run
    log = (out / "run.log").read_text()
    for header in ("| cell | impl | pass |", "| cell | impl | table |", "| order |",
                   "score modifiers:", "Crossover (favor"):
        assert header in log
    printed = [json.loads(line) for line in log.splitlines() if line.startswith('{"')]
    assert {r["section"] for r in printed} >= set(SECTIONS) - {"kernel_tests"}
    summary = (out / "summary.md").read_text()
    assert "**DRY RUN**" in summary and "## Targets" in summary
    for title in ("Calibration", "Kernel tests", "Flash attention", "Paged decode",
                  "End to end", "Score modifiers", "Linear-attention crossover"):
        assert f"## {title}" in summary
    brief = summarize.brief(rows)  # what the script prints last: the device tool's tail
    assert len(brief) < 12000 and "## Targets" in brief and "x cuDNN" in brief
    folder = out / "archive"
    folder.mkdir()
    path = summarize.archive(rows, folder)
    assert re.fullmatch(r"cpu-dry-run-\d{4}-\d{2}-\d{2}\.md", path.name)
    assert "## Raw JSON lines" in path.read_text()
    path.unlink()
    folder.rmdir()


def _flash(cell, kind, s, impl, p, ms, density=0.5):
    return {"section": "flash", "status": "ok", "cell": cell, "kind": kind, "seq_len": s,
            "batch": 1, "num_kv_heads": 8, "head_dim": 128, "impl": impl, "pass": p, "ms": ms,
            "density": density}


def _paged(kh, table, ms, gbps, pct=80.0, batch=16, context=4096):
    return {"section": "paged", "status": "ok", "impl": "tx_pallas", "batch": batch,
            "context": context, "num_heads": 32, "num_kv_heads": kh, "page_size": 16,
            "table": table, "ms": ms, "gb_per_s": gbps, "copy_pct": pct,
            "tokens": batch * context}


def test_targets_from_a_gpu_runs_rows():
    c8, c16, loc = "causal 8k", "causal 16k", "local 16k"
    rows = [_flash(c8, "causal", 8192, "tx_pallas", "fwd", 1.0),
            _flash(c8, "causal", 8192, "tx_pallas", "fwd+bwd", 3.0),
            _flash(c8, "causal", 8192, "cudnn", "fwd", 0.7),
            _flash(c8, "causal", 8192, "cudnn", "fwd+bwd", 2.2),
            _flash(c8, "causal", 8192, "jax_xla", "fwd", 2.5),
            _flash(c8, "causal", 8192, "jax_xla", "fwd+bwd", 7.0),
            _flash(c16, "causal", 16384, "tx_pallas", "fwd", 4.0),
            _flash(c16, "causal", 16384, "tx_pallas", "fwd+bwd", 12.0),
            _flash(loc, "local", 16384, "tx_pallas", "fwd", 0.5, density=0.03125),
            _flash(loc, "local", 16384, "tx_pallas", "fwd+bwd", 1.2, density=0.03125),
            _paged(8, "shuffled", 1.05, 3000.0), _paged(8, "identity", 1.0, 3300.0),
            _paged(32, "shuffled", 4.0, 2900.0), _paged(1, "shuffled", 0.2, 2800.0, pct=70.0)]
    got = {name: (value, verdict) for name, _, value, verdict in summarize.targets(rows)}
    assert got["flash_fwd"] == (pytest.approx(0.7), "MISSED by 0.1")
    assert got["flash_bwd"] == (pytest.approx(1.5 / 2.0), "met")  # bwd = fwd+bwd - fwd
    assert got["flash_vs_xla"] == (pytest.approx(7.0 / 3.0), "met")  # 16k has no xla rows
    assert got["local_window"] == (pytest.approx(0.5 / (4.0 * 0.0625)), "MISSED by 0.75")
    assert got["paged_copy_pct"] == (70.0, "MISSED by 5")
    assert got["paging_overhead_pct"] == (pytest.approx(5.0), "met")
    assert got["gqa_vs_mha"] == (pytest.approx(2800 / 2900), "MISSED by 0.0345")
    assert "- [x] Against the XLA path" in summarize.targets_checklist(rows)
    assert summarize.targets([])[0][2:] == (None, "no data")
    start = {"event": "run_start", "date": "2026-12-07T10:00:00Z", "dry_run": False}
    cal = {"section": "calibrate", "device": "NVIDIA H200", "matmul_tflops": 790.0}
    assert summarize.archive_name([start, cal]) == "h200-2026-12-07.md"
