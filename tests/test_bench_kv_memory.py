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


_PLANNER = _SCRIPT.parent / "kv_memory.py"
_CONFIG = _SCRIPT.parents[1] / "configs" / "decoder_lm.py"


def test_kv_memory_table_is_the_planner_over_dtypes_and_caches():
    """tx-kv-memory prints a row per (cache, dtype), each equal to kv_cache_bytes, and the
    largest batch within --memory_gb."""
    from tx.inference import kv_cache_bytes
    from tx.train import configs as configs_lib
    out = subprocess.run([sys.executable, str(_PLANNER), f"--config={_CONFIG}",
                          "--config.model.attention=gqa", "--config.model.num_kv_heads=2",
                          "--batch=3", "--context=100", "--memory_gb=0.01", "--page_size=16"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    config = configs_lib.load_file(_CONFIG)
    config.model.attention, config.model.num_kv_heads = "gqa", 2
    model = configs_lib.resolve(config).model
    rows = {(r["cache"], r["dtype"]): r for r in summary["rows"]}
    assert len(rows) == 8 and "int4 KIVI" in out and "max batch" in out
    for (cache, dtype), r in rows.items():
        page = 16 if cache == "paged" else None
        name = {"int4 KIVI": "int4", "int4/token": "int4"}.get(dtype, dtype)
        assert r["bytes"] == kv_cache_bytes(model, 3, 100, dtype=name, page_size=page)
        per_seq = kv_cache_bytes(model, 1, 100, dtype=name, page_size=page)
        assert r["max_batch"] == int(0.01 * 2 ** 30 // per_seq)
    assert rows["contiguous", "int8"]["bytes"] < rows["contiguous", "bfloat16"]["bytes"] / 1.5


def test_kv_memory_bad_flag_is_one_line():
    done = subprocess.run([sys.executable, str(_PLANNER), f"--config={_CONFIG}", "--batch=0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == \
        "error: --batch=0 must be >= 1."
