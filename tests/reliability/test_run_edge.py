"""The run-time edge of a training run: attention maps of a trained byte LM (with and without
``--text``), a short run on the default warm-up, two runs started at once on one new workdir,
and a full disk while writing.

One tiny byte-LM run (``lm_run``, 20 steps on the default warm-up) is shared by the tests that
need a trained run."""

import errno
import os
import threading

import jax.numpy as jnp
import ml_collections
import pytest

from tests.test_experiments import ROOT, run, script
from tx.train import configs as configs_lib
from tx.train import loop, optim
from tx.train import workdir as workdir_lib
from tx.train.checkpoint import Checkpointer, CheckpointError
from tx.train.configs import ConfigError
from tx.train.lock import WorkdirLock
from tx.train.metrics import read_jsonl

# configs/decoder_lm.py, small; no warm-up flag: the default resolves to 20 // 10 = 2 steps.
LM = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.data.seq_len=32",
      "--config.model.max_len=32", "--config.train.steps=20", "--config.train.batch_size=4",
      "--config.train.log_every=1", "--config.train.eval_every=20",
      "--config.train.eval_batches=1", "--config.train.checkpoint_every=20"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm")
    out = run(script("train", *LM, workdir=workdir, config="decoder_lm.py"))
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


# ------------------------------------------------------------------------ default warm-up


def test_a_short_run_trains_on_the_default_warmup(lm_run):
    rates = [r["learning_rate"] for r in read_jsonl(lm_run / "metrics.jsonl")]
    assert len(rates) == 20
    assert rates[0] == 0.0 and rates[1] == pytest.approx(1.5e-3)  # warm-up: 2 steps
    assert rates[2] == pytest.approx(3e-3)  # the peak (decoder_lm's learning rate)


def _train(**fields):
    return ml_collections.ConfigDict({**configs_lib.TRAIN, **fields})


def test_the_default_warmup_resolves_from_the_schedule_length():
    assert configs_lib.TRAIN["warmup_steps"] == optim.AUTO_WARMUP
    assert optim.warmup_steps(_train(steps=20)) == 2
    assert optim.warmup_steps(_train(steps=300)) == 20  # decoder_lm's 300 steps: as before
    assert optim.warmup_steps(_train(steps=5)) == 0
    # A resumed run extended to 400 steps keeps its saved 100-step schedule and warm-up.
    assert optim.warmup_steps(_train(steps=400, schedule_steps=100)) == 10
    assert optim.warmup_steps(_train(steps=20, warmup_steps=7)) == 7


def test_an_explicit_warmup_keeps_its_check():
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    config.train.steps = 20
    configs_lib.resolve(config)  # the default adapts
    config.train.warmup_steps = 25
    with pytest.raises(ConfigError, match=r"^config.train.warmup_steps=25: must be < the "
                       r"schedule length \(train.schedule_steps or train.steps\) = 20.$"):
        configs_lib.resolve(config)
    config.train.warmup_steps = -2
    with pytest.raises(ConfigError, match=r"warmup_steps=-2: must be an integer >= 0 \(or -1"):
        configs_lib.resolve(config)


def test_a_run_saved_with_the_warmup_its_default_resolves_to_resumes(tmp_path):
    """decoder_lm.py used to set warmup_steps=20: its runs resume under the default (which
    resolves to 20 for their 300 steps), and a different warm-up is still a diff."""
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    saved = config.to_dict()
    saved["train"].update(warmup_steps=20, schedule_steps=300)
    workdir_lib.check_compatible(saved, config, tmp_path, 100)
    saved["train"]["warmup_steps"] = 30
    with pytest.raises(ConfigError, match="train.warmup_steps: 30 -> 20"):
        workdir_lib.check_compatible(saved, config, tmp_path, 100)


# ------------------------------------------------------------------------- attention maps


@pytest.mark.parametrize("text", ["def f(x): return x", None])
def test_visualize_attention_draws_a_trained_run(lm_run, text):
    png = lm_run / f"maps_{text is None}.png"
    args = [f"--output={png}"] + ([f"--text={text}"] if text is not None else [])
    out = run(script("visualize_attention", *args, workdir=lm_run, config=None))
    assert out.returncode == 0, out.stderr[-2000:]
    assert png.stat().st_size > 1000 and "2 layers x 4 heads" in out.stdout


# --------------------------------------------------------------- two runs on one workdir


def test_write_probes_of_concurrent_runs_do_not_collide(tmp_path):
    (tmp_path / ".tx_write_probe0").mkdir()  # the one name every run used to probe with
    errors = []

    def probe():
        try:
            for _ in range(50):
                configs_lib.check_workdir(tmp_path)
        except ConfigError as e:
            errors.append(e)
    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == [".tx_write_probe0"]  # nothing left


def test_a_second_run_on_a_new_workdir_meets_the_lock_and_names_its_holder(tmp_path):
    workdir = tmp_path / "new"
    workdir.mkdir()
    (workdir / ".tx_write_probe0").mkdir()  # the first run's probe, as the old fixed name
    with WorkdirLock(workdir):  # the first run, which got there an instant earlier
        out = run(script("train", workdir=workdir))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith(f"error: workdir={str(workdir)!r} is in use by pid "
                               f"{os.getpid()} on host"), lines
    assert str(workdir / ".lock") in lines[0] and "another --workdir" in lines[0]


# ------------------------------------------------------------------------------ full disk

_TENSORSTORE_FULL = ('RESOURCE_EXHAUSTED: Error writing "opt_state.inner_state.0.mu.w" in '
                     'OCDBT-based store: [OS error 28: No space left on device] '
                     '[source locations=\'tensorstore/kvstore/file/file_key_value_store.cc\']')


def _raises(error):
    def call(*args, **kwargs):
        raise error
    return call


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError(_TENSORSTORE_FULL),
    RuntimeError(_TENSORSTORE_FULL.replace("No space left on device", "")),
])
def test_a_full_disk_while_saving_is_one_plain_line(tmp_path, monkeypatch, error):
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    expected = (f"disk full while writing {tmp_path / 'checkpoints'}: free space or pick "
                "another --workdir")
    wrapped = RuntimeError("a background save failed")  # ... as Orbax's thread passes it on
    wrapped.__cause__ = error
    try:
        with monkeypatch.context() as m:
            m.setattr(ckpt.latest, "save", _raises(error))  # what a full disk gives
            with pytest.raises(CheckpointError) as err:
                ckpt.save(1, {"params": {"w": jnp.ones(3)}}, {"step": 1})
            assert str(err.value) == expected
            m.setattr(ckpt.latest, "check_for_errors", _raises(wrapped))
            with pytest.raises(CheckpointError) as err:
                ckpt.check_errors()
            assert str(err.value) == expected
    finally:
        ckpt.close()


def test_other_save_failures_keep_their_message(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    try:
        for error in (OSError(errno.EACCES, "Permission denied"),
                      RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                   "allocate 1.00GiB.")):  # memory, not disk
            with monkeypatch.context() as m:
                m.setattr(ckpt.latest, "save", _raises(error))
                with pytest.raises(CheckpointError, match="saving a checkpoint in .* failed"):
                    ckpt.save(1, {"w": jnp.ones(3)}, {"step": 1})
    finally:
        ckpt.close()


def test_a_full_disk_while_logging_is_one_plain_line(tmp_path, monkeypatch):
    from tests.tx.test_train_loop import tiny
    real = loop.pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(loop.pathlib.Path, "write_text", write_text)
    with pytest.raises(CheckpointError) as err:
        loop.run(tiny(steps=2), tmp_path, print_fn=None)
    assert str(err.value) == (f"disk full while writing {tmp_path / 'config.json'}: free "
                              "space or pick another --workdir")
