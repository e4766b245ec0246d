"""The experiment scripts end to end, in subprocesses: one-line errors for bad flags,
evaluation, generation and attention maps (faults and resumes: tests/reliability/)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A small MQAR decoder; 20 steps take about a second on CPU, so a kill lands mid-run.
TINY = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.steps=40",
        "--config.train.warmup_steps=5", "--config.train.log_every=1",
        "--config.train.eval_every=20", "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=20", "--config.train.batch_size=32"]


def script(name, *args, workdir=None, config="mqar.py"):
    cmd = [sys.executable, str(ROOT / "experiments" / f"{name}.py")]
    if config:
        cmd.append(f"--config={ROOT / 'configs' / config}")
    if workdir is not None:
        cmd.append(f"--workdir={workdir}")
    return cmd + list(args)


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, **kwargs)


def losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize("flag,field", [
    ("--config.model.nonexistent=1", "nonexistent"),
    ("--config.train.steps=abc", "steps"),
    ("--config.model.attention=fancy", "attention"),
    ("--config.model.num_kv_heads=3", "num_kv_heads"),
    ("--config.train.grad_accum=3", "grad_accum"),
])
def test_bad_flags_fail_with_one_line_naming_the_field(flag, field, tmp_path):
    out = run(script("train", flag, workdir=tmp_path / "w"))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    naming = [line for line in out.stderr.splitlines() if field in line]
    assert len(naming) == 1, out.stderr


def test_unwritable_workdir_fails_with_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = run(script("train", workdir=blocker / "run"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "workdir=" in out.stderr and "not writable" in out.stderr


def test_evaluate_visualize_and_generate_from_a_trained_run(tmp_path):
    short = [a for a in TINY if "steps=" not in a and "every" not in a]
    assert run(script("train", *short, "--config.train.steps=2",
                      "--config.train.warmup_steps=1", workdir=tmp_path)).returncode == 0
    out = run(script("evaluate", workdir=tmp_path, config=None))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step=2" in out.stdout and "eval_loss=" in out.stdout
    png = tmp_path / "maps.png"
    out = run(script("visualize_attention", f"--output={png}", workdir=tmp_path, config=None))
    assert out.returncode == 0, out.stderr[-2000:]
    assert png.stat().st_size > 1000 and "2 layers x 4 heads" in out.stdout
    for extra in (["--num_beams=2", "--kv_dtype=int8"],
                  ["--temperature=0.7", "--top_k=5", "--cache=paged", "--kv_dtype=int4"]):
        out = run(script("generate", "--prompt=9 10 11", "--max_new_tokens=5", *extra,
                         workdir=tmp_path, config=None))
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "# checkpoint step 2" and 1 <= len(lines[1].split()) <= 5
    # KIVI needs pages: refused in one line, naming the flag, before the model loads.
    out = run(script("generate", "--prompt=9", "--kv_dtype=int4", workdir=tmp_path, config=None))
    assert out.returncode == 1 and out.stderr.startswith("error: kv_dtype='int4'")


def test_console_entry_points_run_the_scripts(tmp_path):
    """`tx-train` (installed by pip beside this Python) is experiments/train.py."""
    entry = pathlib.Path(sys.executable).parent / "tx-train"
    if not entry.exists():
        pytest.skip("tx is not pip-installed in this environment (no console scripts)")
    out = run([str(entry), f"--config={ROOT / 'configs' / 'mqar.py'}",
               f"--workdir={tmp_path}", *TINY[:2], "--config.train.steps=2",
               "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
               "--config.train.warmup_steps=1", "--config.train.eval_batches=1"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(losses(tmp_path)) >= 2
    bad = run([str(pathlib.Path(sys.executable).parent / "tx-ablate"), "--workdir=/x",
               f"--config={ROOT / 'configs' / 'ablation.py'}", "--config.model.nmu_heads=2"])
    assert bad.returncode != 0 and "nmu_heads" in bad.stderr
