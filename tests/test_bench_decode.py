"""experiments/bench_decode.py runs at a smoke size and emits its JSON lines: generation with
and without the KV cache, and the paged decode kernel beside its reference and JAX's own."""

import json
import pathlib
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_decode.py"


def test_bench_decode_smoke():
    out = subprocess.run([sys.executable, str(_SCRIPT), "--new_tokens=8", "--prompt=4",
                          "--layers=1", "--repeats=1", "--kernel_batch=2",
                          "--kernel_context=40", "--kv_dtype=int4"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    decode = [r for r in rows if r["bench"] == "decode"]
    # KIVI int4 needs pages: one extra row, on the paged cache.
    assert [(r["cache"], r["kv_dtype"]) for r in decode] == [
        ("contiguous", "auto"), ("paged", "auto"), ("none", "auto"), ("paged", "int4")]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 8 for r in decode)
    assert "tokens/s" in out and decode[0]["cache_speedup"] > 0
    kernel = {r["impl"]: r for r in rows if r["bench"] == "paged_kernel"}
    assert {"tx_pallas", "tx_pallas_split", "xla"} <= set(kernel)
    for name in ("tx_pallas", "tx_pallas_split", "xla"):
        assert kernel[name]["max_abs_err"] < 1e-5 and kernel[name]["gb_per_s"] > 0, name
    assert "GB/s" in out and "% copy" in out
