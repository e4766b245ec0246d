"""experiments/bench_kv_quant.py runs at a smoke size (2 training steps, 4 prompts, 24 decode
steps, a 1-layer LLaMA) and its JSON line holds every (model, storage) row with relations
that hold whatever the weights: the fp32 row compares the fp32 cache with itself (errors
exactly 0, full agreement), its teacher-forced loop matches one cache-free forward pass,
quantised storage is smaller (int4 < int8 < fp32) and int8 is closer to fp32 than int4.
Timings and the int4 per-token / KIVI ranking are never asserted."""

import json
import math
import os
import pathlib
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_kv_quant.py"
_KVS = ("fp32", "int8", "int4_per_token", "int4_kivi")
# The script inherits the conftest's XLA_FLAGS (cheap LLVM compiles) with the environment.
_ENV = {"JAX_NUMPY_RANK_PROMOTION": "raise", "JAX_NUMPY_DTYPE_PROMOTION": "strict"}


def test_bench_kv_quant_smoke():
    hf = True
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        hf = False  # the byte LM rows still run
    args = [sys.executable, str(_SCRIPT), "--train_steps=2", "--train_batch=4", "--prompts=4",
            "--prompt_len=8", "--new_tokens=24", "--repeats=1", "--hf_layers=1",
            "--hf_d_model=64"] + ([] if hf else ["--skip_hf"])
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, **_ENV}).stdout
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and out.rstrip().endswith(lines[0])  # one JSON line, last
    result = json.loads(lines[0])
    assert result["bench"] == "kv_quant" and result["new_tokens"] == 24
    assert all(result[k] for k in ("device", "jax", "python"))
    models = ("byte_lm", "hf_llama") if hf else ("byte_lm",)
    rows = {(r["model"], r["kv"]): r for r in result["rows"]}
    assert set(rows) == {(m, kv) for m in models for kv in _KVS}
    assert "max|dlogit|" in out and "int4_kivi" in out  # the table

    for model in models:
        fp32, int8, int4, kivi = (rows[model, kv] for kv in _KVS)
        for r in (fp32, int8, int4, kivi):
            assert r["page_size"] == 16 and r["tokens_per_s"] > 0, r
            assert r["planner_matches_measured"], r
            assert math.isfinite(r["eval_loss"]) and math.isfinite(r["eval_loss_delta"])
            for key in ("tf_argmax_agreement", "free_agreement"):
                assert 0.0 <= r[key] <= 1.0, (key, r)
            assert 0.0 <= r["free_prefix_mean"] <= 24
            assert r["max_abs_logit_err"] >= r["mean_abs_logit_err"] >= 0.0
        # fp32 against itself, and its teacher-forced decode against a plain forward pass.
        assert fp32["max_abs_logit_err"] == 0.0 and fp32["mean_abs_logit_err"] == 0.0
        assert fp32["tf_argmax_agreement"] == 1.0 and fp32["free_agreement"] == 1.0
        assert fp32["eval_loss_delta"] == 0.0 and fp32["compression"] == 1.0
        assert fp32["fp32_vs_forward_max_abs"] <= 1e-4
        # Memory: quantised pages are smaller; KIVI's fp32 partial page only adds per sequence.
        assert int8["bytes_per_token"] < fp32["bytes_per_token"]
        assert int4["bytes_per_token"] < int8["bytes_per_token"]
        assert kivi["bytes_per_token"] < int8["bytes_per_token"]
        assert kivi["effective_bytes_per_token"] > kivi["bytes_per_token"]
        assert int4["effective_bytes_per_token"] == int4["bytes_per_token"]  # 32 = 2 pages
        # int8 is close to fp32 and closer than per-token int4 (16x coarser steps).
        logit_std = fp32["model_info"]["logit_std"]
        assert 0.0 < int8["mean_abs_logit_err"] < 0.05 * logit_std
        assert int8["mean_abs_logit_err"] < int4["mean_abs_logit_err"]
        assert abs(int8["eval_loss_delta"]) < 0.02
        for r in (int8, int4, kivi):
            assert r["max_abs_logit_err"] > 0.0  # quantisation did happen
