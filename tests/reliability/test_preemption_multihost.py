"""SIGTERM reaching one host of a two-process run (two CPU devices each): every process stops
after the same step, the checkpoint of that step is written collectively, and all exit 75."""

import os
import signal
import subprocess
import time

from tests.test_experiments import ROOT, script
from tests.test_multihost import FLAGS, _free_port, _losses


def test_sigterm_on_one_host_stops_every_host_after_the_same_step(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                         "--xla_backend_optimization_level=0")
    flags = {**FLAGS, "train.steps": 500, "train.checkpoint_every": 500,
             "train.eval_every": 500}
    args = [f"--config.{k}={v}" for k, v in flags.items()] + [
        "--config.mesh.data=2", "--config.mesh.tensor=2", "--multihost",
        f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    procs = [subprocess.Popen(script("train", *args, f"--process_id={i}", workdir=tmp_path),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in procs), "a process ended before the signal"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 learns it from 1
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [75, 75], [err[-2000:] for _, err in outs]
    stopped = len(_losses(tmp_path))
    assert 3 <= stopped < 500
    assert (tmp_path / "checkpoints" / str(stopped)).is_dir()
    assert f"stopped by SIGTERM after step {stopped}" in outs[1][1]
    assert f"stopped by a signal on another host after step {stopped}" in outs[0][1]
