"""experiments/bench_kv_memory.py runs on a 200-request workload and meets the issue's targets."""

import json
import pathlib
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_kv_memory.py"


def test_bench_kv_memory_targets():
    out = subprocess.run([sys.executable, str(_SCRIPT), "--requests=200", "--page_sizes=16"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {"contiguous_utilization", "paged_utilization",
                            "prefix_sharing_saving"}
    assert 0 < summary["contiguous_utilization"] < 0.5  # reserving max_len wastes most slots
    assert summary["paged_utilization"] >= 0.96
    assert summary["prefix_sharing_saving"] >= 0.5
    table = "\n".join(lines[:-1])
    assert "contiguous" in table and "paged+sharing" in table
