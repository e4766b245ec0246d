"""What a training run survives, end to end in subprocesses of experiments/train.py: SIGKILL,
SIGTERM (once and twice), a save killed mid-write, a corrupt or truncated checkpoint, a full
disk during a background save, and a second run on the same workdir.

One uninterrupted run (``reference``) is shared by every test that compares losses with it."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_experiments import ROOT, TINY, losses, run, script

# After this many logged steps a run is past its first checkpoint (step 20) and mid-way to
# its second, so a signal lands on a step that is not a checkpoint step.
_PAST_FIRST_CHECKPOINT = 25


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run: checkpoints at 20 and 40."""
    workdir = tmp_path_factory.mktemp("reference")
    out = run(script("train", *TINY, workdir=workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


def _start(workdir, *args, **kwargs):
    return subprocess.Popen(script("train", *TINY, *args, workdir=workdir), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(proc, ready, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline
        time.sleep(0.002)


def _logged(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def test_sigkill_after_a_checkpoint_then_resume_is_exact(reference, tmp_path):
    proc = _start(tmp_path)
    _wait_for(proc, lambda: (tmp_path / "checkpoints" / "20").is_dir())
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert losses(tmp_path)[-1][0] < 40
    resumed = run(script("train", *TINY, workdir=tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 20" in resumed.stdout
    assert losses(tmp_path) == losses(reference)


def test_sigterm_saves_the_step_in_flight_and_exits_75_then_resume_is_exact(reference,
                                                                            tmp_path):
    proc = _start(tmp_path)
    _wait_for(proc, lambda: _logged(tmp_path) >= _PAST_FIRST_CHECKPOINT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = losses(tmp_path)[-1][0]
    assert _PAST_FIRST_CHECKPOINT <= stopped < 40
    assert _steps(tmp_path)[-1] == stopped  # the step in flight was saved, not only step 20
    assert f"stopped by SIGTERM after step {stopped}" in err.strip().splitlines()[-1]
    resumed = run(script("train", *TINY, workdir=tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {stopped}" in resumed.stdout
    assert losses(tmp_path) == losses(reference)


def test_a_second_signal_exits_at_once():
    # The handler alone, in a bare interpreter: the first SIGTERM only raises the flag, the
    # second ends the process by SIGTERM's default action.
    code = ("import os, signal\n"
            "from tx.train.preemption import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert stop.requested()\n"
            "    print('first handled', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('still alive', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert out.stdout.splitlines() == ["first handled"]


def test_save_killed_mid_write_is_not_taken_for_complete(tmp_path):
    # Big enough that a synchronous save takes a while; kill while it is in its temporary dir.
    big = ["--config.model.d_model=512", "--config.model.d_ff=2048",
           "--config.model.num_layers=4", "--config.train.steps=6",
           "--config.train.checkpoint_every=2", "--config.train.async_checkpoints=false",
           "--config.train.batch_size=2", "--config.data.seq_len=24",
           "--config.model.max_len=24", "--config.data.options.num_kv_pairs=4",
           "--config.train.eval_every=100", "--config.train.warmup_steps=1"]
    ckpts = tmp_path / "checkpoints"

    def writing_after_a_complete_one():
        names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
        return "2" in names and any("tmp" in n for n in names)

    proc = subprocess.Popen(script("train", *big, workdir=tmp_path), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(proc, writing_after_a_complete_one)
    proc.kill()
    proc.wait()
    assert [p.name for p in ckpts.iterdir() if "tmp" in p.name], "no torn save to test"
    resumed = run(script("train", *big, workdir=tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 2" in resumed.stdout
    assert not [p for p in ckpts.iterdir() if "tmp" in p.name]  # cleaned up on restart
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 7))


def _largest_array_file(workdir, step) -> pathlib.Path:
    files = (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("d/*")
    return max(files, key=lambda p: p.stat().st_size)


def _reader_falls_back_past_40(workdir, capsys):
    """Loads ``workdir``'s model as evaluate.py and generate.py do (``workdir.load_model``,
    parameters only): checkpoint 40 must be reported in one line and step 20 loaded.
    -> (resolved config, the line)."""
    from tx.train import configs as configs_lib
    from tx.train import workdir as workdir_lib
    resolved = configs_lib.resolve(workdir_lib.saved_config(workdir))
    _, step = workdir_lib.load_model(resolved, workdir)
    assert step == 20
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint 40 in "), lines
    return resolved, lines[0]


def test_a_corrupt_checkpoint_is_reported_moved_aside_and_the_run_falls_back(reference,
                                                                            tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    path = _largest_array_file(workdir, 40)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\x7f" * 64  # bytes flipped on disk, file size unchanged
    path.write_bytes(data)
    out = run(script("train", *TINY, workdir=workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    report = [line for line in out.stdout.splitlines() if "checkpoint 40" in line]
    # Which of the two checks catches the flip depends on what lies mid-file, and Orbax's write
    # order varies: bytes inside a compressed chunk fail to decode ("cannot be read"), others
    # decode to values that miss their checksum ("is corrupt", pinned down by the next test).
    assert len(report) == 1, out.stdout
    assert "is corrupt: array " in report[0] or "cannot be read (array " in report[0], report
    assert "resuming from step 20" in out.stdout
    assert (workdir / "corrupt" / "40").is_dir()  # kept for inspection, never deleted
    assert losses(workdir) == losses(reference)  # steps 21-40 retrained from step 20


def test_an_array_that_misses_its_checksum_is_corrupt_and_readers_fall_back(reference,
                                                                           tmp_path, capsys):
    """Values that read back but differ from what was saved (recorded here as a changed
    checksum, so that the arrays themselves decode) are caught by the checksum check."""
    import json
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    meta_file = workdir / "checkpoints" / "40" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    name = next(key for key in meta["checksums"] if key.startswith("['params']"))
    meta["checksums"][name] = f"{int(meta['checksums'][name], 16) ^ 1:016x}"
    meta_file.write_text(json.dumps(meta))
    _, line = _reader_falls_back_past_40(workdir, capsys)
    assert f"is corrupt: array {name} does not match the checksum" in line, line


def test_a_truncated_checkpoint_is_reported_and_readers_fall_back(reference, tmp_path, capsys):
    from tx.train import loop
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    # Every data file of step 40: readers restore the parameters alone, so a truncated file
    # holding only optimizer state would (rightly) not stop them; which file holds what is
    # Orbax's layout.
    for path in (workdir / "checkpoints" / "40" / "state").rglob("d/*"):
        os.truncate(path, path.stat().st_size // 3)
    resolved, line = _reader_falls_back_past_40(workdir, capsys)
    assert "checkpoint 40" in line and "cannot be read" in line and "falling back" in line
    assert (workdir / "checkpoints" / "40").is_dir()  # readers leave it in place
    with pytest.raises(loop.CheckpointError, match="checkpoint 40 .* cannot be read"):
        loop.load_model(resolved, workdir, step=40)  # an explicit step never falls back


def _on_a_full_disk(cmd, limit_bytes):
    """``cmd`` in a process whose files cannot grow past ``limit_bytes`` (writes fail with
    EFBIG, as on a full disk). A launcher sets the limit and execs, so nothing runs between
    fork and exec in this (threaded) test process. It also leaves the tests' shared
    compilation cache (tests/conftest.py): that cache is the harness's, and a truncated entry
    would outlive this process and warn in every later one."""
    launcher = ("import os, resource, signal, sys\n"
                "os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)\n"
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
                "os.execv(sys.argv[1], sys.argv[1:])\n")
    return [sys.executable, "-c", launcher, *cmd]


def test_a_failed_background_save_ends_the_run_with_one_line(tmp_path):
    # Small files (metrics, config) still fit; the first checkpoint's array file does not.
    start = time.monotonic()
    out = run(_on_a_full_disk(script("train", *TINY, workdir=tmp_path), 60_000))
    assert out.returncode == 1
    assert time.monotonic() - start < 200  # it used to hang until killed
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"error: saving a checkpoint in {tmp_path / 'checkpoints'}")
    assert "checkpoint_errors.log" in lines[0]
    assert "Traceback" in (tmp_path / "checkpoint_errors.log").read_text()  # details kept


def test_a_second_run_on_a_busy_workdir_fails_naming_the_holder(tmp_path):
    from tx.train import configs as configs_lib
    from tx.train import loop
    from tx.train.lock import WorkdirLock
    proc = _start(tmp_path, "--config.train.steps=400")
    try:
        _wait_for(proc, lambda: _logged(tmp_path) >= 1)
        with pytest.raises(configs_lib.ConfigError, match=f"in use by pid {proc.pid} on host"):
            loop.run(configs_lib.load_file(ROOT / "configs" / "mqar.py"), tmp_path,
                     print_fn=None)
    finally:
        proc.kill()
        proc.wait()
    with WorkdirLock(tmp_path):  # the kernel released the killed holder's lock
        pass
