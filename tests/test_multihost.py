"""``experiments/train.py --multihost`` on two processes of two CPU devices each (Gloo
collectives): one mesh spans both, only process 0 writes logs, Orbax writes the checkpoint
collectively, and the losses are the single-device run's."""

import json
import os
import pathlib
import socket
import subprocess

import numpy as np

from tests.test_experiments import ROOT, script
from tx.train import loop
from tx.train.configs import load_file

FLAGS = {"model.d_model": 32, "model.d_ff": 64, "model.num_heads": 4, "train.steps": 2,
         "train.warmup_steps": 1, "train.batch_size": 4, "train.log_every": 1,
         "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2,
         "train.async_checkpoints": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_two_processes_train_like_one_device(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                         "--xla_backend_optimization_level=0")
    port = _free_port()
    args = [f"--config.{k}={v}" for k, v in FLAGS.items()] + [
        "--config.mesh.data=2", "--config.mesh.tensor=2", "--multihost",
        f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(script("train", *args, f"--process_id={i}",
                                     workdir=tmp_path / "multi"),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "steps=2" in outs[0][0] and "steps=2" not in outs[1][0]  # only process 0 prints
    assert (tmp_path / "multi" / "checkpoints" / "2").is_dir()

    config = load_file(ROOT / "configs" / "mqar.py")
    for key, value in FLAGS.items():
        section, field = key.split(".")
        config[section][field] = value
    loop.run(config, tmp_path / "single", print_fn=None)
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                               rtol=2e-6)
