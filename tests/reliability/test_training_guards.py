"""Guards inside one process: the non-finite guard covers the update and the new parameters,
no checkpoint is written from a non-finite state, absurd learning rates are refused,
checksums catch single changed values, and extending a run keeps its schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tx.test_train_loop import _nan_dataset, losses, tiny
from tx import data
from tx.train import configs as configs_lib
from tx.train import integrity, loop, optim
from tx.train.checkpoint import CheckpointError, Checkpointer
from tx.train.metrics import read_jsonl


@pytest.mark.parametrize("inner", [optax.scale(jnp.inf), optax.scale(3e38)],
                         ids=["update_is_inf", "params_overflow"])
def test_guard_skips_an_update_that_finite_gradients_make_nonfinite(inner):
    params = {"w": jnp.full((3,), 1e38)}  # near float32 max: a large update overflows
    guard = optim.skip_nonfinite(inner)
    state = guard.init(params)
    updates, state = guard.update({"w": jnp.ones((3,))}, state, params)
    assert not np.any(updates["w"])  # nothing applied: the parameters stay as they were
    assert int(optim.nonfinite_count(state)) == 1 and int(optim.total_nonfinite(state)) == 1
    # A finite update afterwards applies and resets the streak.
    guard = optim.skip_nonfinite(optax.scale(0.5))
    state = guard.init(params)
    updates, state = guard.update({"w": jnp.ones((3,))}, state, params)
    np.testing.assert_array_equal(updates["w"], 0.5)
    assert int(optim.nonfinite_count(state)) == 0


def test_a_nonfinite_streak_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    class NaNFromStep5:  # batches 0-3 (steps 1-4) are clean, then every loss is NaN
        def __init__(self, **kwargs):
            self.clean, self.bad = data.make_dataset("mqar", **kwargs), _nan_dataset(**kwargs)
            self.task, self.vocab_size = self.clean.task, self.clean.vocab_size

        def batch(self, step):
            return (self.clean if step < 4 else self.bad).batch(step)
    NaNFromStep5.options = data.REGISTRY["mqar"].options
    monkeypatch.setitem(data.REGISTRY, "nan_from_5", NaNFromStep5)
    config = tiny(steps=12, checkpoint_every=2, max_nonfinite=3)
    config.data.name = "nan_from_5"
    lines = []
    with pytest.raises(loop.NonFiniteError, match=r"newest checkpoint \(step 4\) is from before"):
        loop.run(config, tmp_path, print_fn=lines.append)
    assert any(line.startswith("step 6: not saved") for line in lines)
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    try:
        assert ckpt.all_steps() == [2, 4]
        meta = ckpt.read_meta(4)
    finally:
        ckpt.close()
    assert meta["step"] == 4 and meta["checksums"]  # verified (and finite) on every restore


def test_a_state_holding_nan_is_never_saved(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    try:
        state = {"params": {"w": jnp.array([1.0, jnp.nan])}, "rest": {}, "opt_state": {}}
        with pytest.raises(CheckpointError, match="not saving step 3: .* NaN or Inf"):
            ckpt.save(3, state, {"step": 3})
        assert ckpt.all_steps() == []
    finally:
        ckpt.close()


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 1e30, 11.0, 0.0, -1e-3])
def test_config_refuses_a_nonfinite_or_absurd_learning_rate(lr):
    config = tiny()
    config.train.learning_rate = lr
    with pytest.raises(configs_lib.ConfigError, match=r"config\.train\.learning_rate=.*<= 10"):
        configs_lib.resolve(config)


def test_checksums_catch_one_changed_value_under_any_sharding():
    tree = {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8), "b": jnp.ones(3, jnp.bfloat16),
            "key": jax.random.key_data(jax.random.key(1)), "n": jnp.arange(5)}
    sums, finite = integrity.summarise(tree)
    assert finite and len(sums) == 4
    for name, changed in [("['w']", tree["w"].at[3, 4].add(1e-6)),
                          ("['b']", tree["b"].at[2].set(1.0078125)),
                          ("['n']", tree["n"].at[0].set(-0))]:
        key = name[2:-2]
        other, _ = integrity.summarise({**tree, key: changed})
        same = bool(jnp.all(changed == tree[key]))
        assert integrity.first_mismatch(sums, other) == (None if same else name)
    # Swapping two values changes the sums too (the positions are weighted).
    swapped = tree["w"].at[0, 0].set(tree["w"][0, 1]).at[0, 1].set(tree["w"][0, 0])
    assert integrity.first_mismatch(sums, integrity.summarise({**tree, "w": swapped})[0])
    # The value is a property of the array, not of its layout on devices.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    sharded = jax.device_put(tree["w"], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("x")))
    assert integrity.summarise({**tree, "w": sharded})[0] == sums
    assert not integrity.summarise({"w": tree["w"].at[0, 0].set(jnp.inf)})[1]


def test_extending_a_run_keeps_the_schedule_it_started_on(tmp_path):
    loop.run(tiny(steps=4), tmp_path, print_fn=None)
    lines = []
    summary = loop.run(tiny(steps=6), tmp_path, print_fn=lines.append)
    assert summary["steps"] == 6 and len(losses(tmp_path)) == 6
    assert any("keeps the length this run started with (4 steps)" in line for line in lines)
    train = tiny(steps=4).train
    train.schedule_steps = 4
    expected = optim.schedule(train)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for r in records:  # every step, before and after the extension, on the 4-step curve
        assert r["learning_rate"] == pytest.approx(float(expected(r["step"] - 1)), rel=1e-6)
    assert configs_lib.load_file  # the saved config records the schedule length
    saved = loop.saved_config(tmp_path)
    assert saved.train.schedule_steps == 4 and saved.train.steps == 6


def test_a_checkpoint_directory_that_turns_unwritable_fails_with_one_line(tmp_path):
    # As root no permission bit stops a write, so the directory is replaced by a file.
    import shutil
    ckpt = Checkpointer(tmp_path, keep=2, async_save=True)
    state = {"params": {"w": jnp.ones(3)}, "rest": {}, "opt_state": {}}
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    shutil.rmtree(ckpt.directory)
    ckpt.directory.write_text("")
    with pytest.raises(CheckpointError) as err:
        ckpt.save(2, state, {"step": 2})
        ckpt.wait()
    text = str(err.value)
    assert text.startswith(f"saving a checkpoint in {ckpt.directory} failed: ")
    assert "\n" not in text
    ckpt.close()  # the failure is reported once; closing still stops Orbax's threads
