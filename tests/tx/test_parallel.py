"""Scale-out: the same config on a (data, fsdp, tensor) mesh of 8 fake CPU devices trains with
the single-device losses, shards parameters as the rules say, moves checkpoints between meshes,
and runs the Pallas kernels per shard. Bad meshes fail before anything compiles.

JAX fixes its device count at start-up (pytest workers already run with one CPU device), so
the 8-device checks run in one subprocess per test (``tests/tx/mesh_checks.py``).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tx.parallel import MeshConfig
from tx.train import configs as configs_lib
from tx.train import loop
from tx.train.configs import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESHES = ["8x1x1", "1x8x1", "2x2x2", "1x2x4"]


def eight_devices(*checks) -> dict:
    # The conftest's XLA_FLAGS (cheap LLVM compiles; every comparison is within one process)
    # and eight host devices.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, "-m", "tests.tx.mesh_checks", *checks], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line.pop("check"): line for line in lines}


def test_meshes_train_like_one_device_shard_by_the_rules_and_swap_checkpoints():
    out = eight_devices("train", "checkpoint")
    train, ckpt = out["train"], out["checkpoint"]
    for model in ("decoder", "seq2seq"):
        single = train[f"{model}/1x1x1"]["losses"]
        for mesh in MESHES:
            np.testing.assert_allclose(train[f"{model}/{mesh}"]["losses"], single, rtol=2e-6,
                                       err_msg=f"{model} on {mesh}")
        # Per-device parameter bytes: 1/8 under FSDP 8, whole under pure data parallelism.
        assert train[f"{model}/1x8x1"]["memory_fraction"] == pytest.approx(1 / 8)
        assert train[f"{model}/8x1x1"]["memory_fraction"] == 1.0
        assert train[f"{model}/1x2x4"]["memory_fraction"] < 0.15
    specs = train["decoder/1x2x4"]["specs"]
    block = "['tower']['blocks'][0]"
    assert specs[f"{block}['self_attn']['q_dnh'].value"] == "P('fsdp', 'tensor', None)"
    assert specs[f"{block}['self_attn']['k_dkh'].value"] == "P('fsdp', 'tensor', None)"
    assert specs[f"{block}['self_attn']['o_nhd'].value"] == "P('tensor', None, 'fsdp')"
    assert specs[f"{block}['mlp']['wi_gate']['kernel'].value"] == "P('fsdp', 'tensor')"
    assert specs[f"{block}['mlp']['wo']['kernel'].value"] == "P('tensor', 'fsdp')"
    assert specs["['head']['embed']['table_vd'].value"] == "P('tensor', 'fsdp')"
    assert specs["['tower']['final_norm']['scale'].value"] == "P('fsdp',)"
    # Saved on (2, 2, 2) after two steps; restored on (1, 8, 1) and on one device.
    for mesh, devices in (("1x8x1", 8), ("1x1x1", 1)):
        assert ckpt[mesh]["identical"], mesh
        assert ckpt[mesh]["devices"] == devices
        np.testing.assert_allclose(ckpt[mesh]["losses"], ckpt["continued"], rtol=2e-6)


def test_pallas_kernels_and_kv_caches_run_per_shard():
    out = eight_devices("kernels")["kernels"]
    np.testing.assert_allclose(*out["flash_loss"], rtol=1e-6)
    assert out["flash_grad_err"] < 3e-6
    np.testing.assert_allclose(*out["mqa_loss"], rtol=1e-6)
    assert out["mqa_grad_err"] < 3e-6
    np.testing.assert_allclose(*out["cpu_loss"], rtol=1e-6)  # MQA, as the run above
    assert out["cpu_grad_err"] < 3e-6
    assert out["paged_err"] < 1e-5
    assert "fsdp" in out["paged_spec"] and "tensor" in out["paged_spec"]  # really split
    # A decoder's KV cache [B, S, K, H] split by rows and K/V heads; prefill + decode agree.
    assert out["cache_spec"] == "P('fsdp', None, 'tensor')"
    assert out["decode_err"] < 1e-5


# ------------------------------------------------------------------- validation, in-process


def tiny(mesh=(1, 1, 1), **model):
    config = configs_lib.load_file(ROOT / "configs" / "mqar.py")
    config.model.d_model, config.model.d_ff, config.model.num_heads = 32, 64, 8
    config.model.update(model)
    config.train.batch_size = 8
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    return config


@pytest.mark.parametrize("mesh,model,match", [
    ((2, 2, 2), {}, r"config\.mesh\.data \* mesh\.fsdp \* mesh\.tensor = 2 \* 2 \* 2 = 8, "
                    r"but jax\.device_count\(\) is 1"),
    ((1, 1, 3), {}, r"config\.mesh\.tensor=3 must divide model\.num_heads=8"),
    ((1, 1, 4), {"num_kv_heads": 2}, r"config\.mesh\.tensor=4 must divide "
                                     r"model\.num_kv_heads=2"),
    ((1, 3, 1), {}, r"config\.train\.batch_size=8 must be divisible by mesh\.data \* "
                    r"mesh\.fsdp = 1 \* 3 = 3"),
    ((0, 1, 1), {}, r"config\.mesh\.data=0: must be a positive integer"),
])
def test_bad_meshes_fail_before_anything_compiles(mesh, model, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        loop.run(tiny(mesh, **model), tmp_path, print_fn=None)
    assert not (tmp_path / "checkpoints").exists()


def test_mqa_keeps_its_one_kv_head_on_every_tensor_shard():
    MeshConfig(tensor=4).check_heads(num_heads=8, num_kv_heads=1)  # allowed: replicated
    with pytest.raises(ValueError, match="mesh.tensor=4 must divide model.num_kv_heads=2"):
        MeshConfig(tensor=4).check_heads(num_heads=8, num_kv_heads=2)


def test_a_mesh_change_does_not_block_resuming_and_saved_configs_fit_this_machine(tmp_path):
    config = tiny()
    saved = config.to_dict()
    saved["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
    assert configs_lib.diff(saved, config.to_dict()) == []
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert loop.saved_config(tmp_path).mesh.to_dict() == {"data": 1, "fsdp": 1, "tensor": 1,
                                                          "context": 1,
                                                          "context_attention": "ring"}
