"""experiments/bench_vs_hf.py runs at a smoke size: tx and ``transformers`` on the same LLaMA,
Mamba-2 and DeepSeek-V3 (dense, MLA) weights agree (logits within 1e-4, identical greedy tokens
from the contiguous and paged caches, the paged latent cache for DeepSeek-V3, Mamba-2 from its
state) and every row of the table comes out as a JSON line. Timings are never asserted."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_vs_hf.py"


def test_bench_vs_hf_smoke():
    # LLaMA (GQA, RoPE, SwiGLU), Mamba-2 (the recurrent row, no attention or paged rows) and
    # DeepSeek-V3 (MLA: q/k head dim 96 = nope 64 + rope 32, v 64): GPT-2's parity is held by
    # tests/tx/test_interop_hf.py. One process for all three (start-up is most of the cost).
    out = subprocess.run([sys.executable, str(_SCRIPT), "--models=llama,mamba2,deepseek_v3",
                          "--d_model=32",
                          "--layers=1", "--vocab=97", "--batch=2", "--seq=8", "--prompt=3",
                          "--new_tokens=3", "--decode_batches=2", "--repeats=1",
                          "--torch_threads=1", "--pause=0"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    mamba2_path = "cuda_kernels" if importlib.util.find_spec("mamba_ssm") else "torch_forward"
    assert {(r["model"], r["work"]) for r in rows} == {
        ("llama", w) for w in ("forward", "train", "attention", "attention_xla", "decode",
                               "paged_vs_contiguous")} | {
        ("mamba2", w) for w in ("forward", "train", "decode")} | {
        ("deepseek_v3", w) for w in ("forward", "train", "attention", "attention_xla", "decode",
                                     "paged_vs_contiguous")}
    for r in rows:
        # Without mamba_ssm (any CPU) transformers runs its PyTorch reference path; the row says
        # which one it timed.
        assert r.get("torch_path") == (mamba2_path if r["model"] == "mamba2" else None)
        assert r["bench"] == "vs_hf" and r["tx_tokens_per_s"] > 0 and r["torch_threads"] == 1
        if r["work"] == "forward":
            assert r["max_abs_logit_diff"] <= 1e-4
        if r["work"] == "train":
            assert r["first_loss_diff"] <= 1e-4
        if r["work"].startswith("attention"):
            shape = (r["heads"], r["kv_heads"], r["head_dim"], r.get("v_head_dim", r["head_dim"]))
            assert r["max_abs_grad_diff"] <= 1e-4 and shape == \
                ((4, 4, 96, 64) if r["model"] == "deepseek_v3" else (8, 2, 4, 4))
            assert r["implementation"] == ("cpu,xla" if r["work"] == "attention" else "xla")
        if r["work"] in ("decode", "paged_vs_contiguous"):
            assert r["greedy_identical"] and r["batch"] == 2 and r["tokens"] == 6
    assert "tx / PyTorch" in out and "mamba2: transformers ran its" in out
