"""experiments/bench_decode.py runs at a smoke size and emits its JSON lines."""

import json
import pathlib
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_decode.py"


def test_bench_decode_smoke():
    out = subprocess.run([sys.executable, str(_SCRIPT), "--new_tokens=8", "--prompt=4",
                          "--layers=1", "--repeats=1"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["cache"] for r in rows] == ["contiguous", "none"]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 8 for r in rows)
    assert "tokens/s" in out and rows[0]["cache_speedup"] > 0
