"""How kernels.cpu_attention builds, names and loads its library: the cache key (compiler
version, the target ``-march=native`` resolves to), the temporary-then-renamed build, the one
warning when it cannot build, and ``TX_CPU_KERNEL``. Cheap: the compiler is faked, except in
the one subprocess that finds none."""
import os
import pathlib
import subprocess
import sys
import threading
import time
import types

import jax.numpy as jnp
import pytest

from tx.kernels import cpu_attention

_ROOT = pathlib.Path(__file__).resolve().parents[2]

_GCC_V = """Using built-in specs.
Configured with: ../src/configure -v --with-gcc-major-version-only
gcc version 12.2.0 (Debian 12.2.0-14+deb12u1)
 /usr/lib/gcc/x86_64-linux-gnu/12/cc1plus -E -quiet -v -imultiarch x86_64-linux-gnu - \
-march=znver3 -mmmx -mavx2 -mno-xop -mavx512f --param l1-cache-size=32 -mtune=znver3 -dumpbase -
"""
_CLANG_V = """Debian clang version 16.0.6 (15~deb12u1)
Target: x86_64-pc-linux-gnu
 "/usr/lib/llvm-16/bin/clang" -cc1 -triple x86_64-pc-linux-gnu -E -mrelocation-model pic \
-target-cpu skylake -target-feature +avx2 -target-feature -avx512f -mllvm -x86-asm -x c++ -
"""


def _fake_run(stderr: str, returncode: int = 0):
    def run(cmd, **kwargs):
        return types.SimpleNamespace(returncode=returncode, stdout="", stderr=stderr)
    return run


@pytest.mark.parametrize("stderr,version,target", [
    (_GCC_V, "gcc version 12.2.0 (Debian 12.2.0-14+deb12u1)",
     "-march=znver3 -mmmx -mavx2 -mno-xop -mavx512f -mtune=znver3"),
    (_CLANG_V, "Debian clang version 16.0.6 (15~deb12u1)",
     "-mrelocation-model -target-cpu=skylake -target-feature=+avx2 -target-feature=-avx512f"),
])
def test_one_compiler_call_gives_its_version_and_the_native_target(monkeypatch, stderr,
                                                                   version, target):
    monkeypatch.setattr(cpu_attention.subprocess, "run", _fake_run(stderr))
    monkeypatch.setattr(cpu_attention.shutil, "which", lambda cxx: f"/usr/bin/{cxx}")
    name = f"fake-cxx-{hash(stderr)}"  # _probe caches per compiler: a name of its own
    assert cpu_attention._probe(name) == (version, target)
    assert cpu_attention._compiler_version(name) == version
    assert cpu_attention._native_target(name) == target


def test_a_silent_compiler_falls_back_to_the_cpu_features():
    assert cpu_attention._compiler_version("no-such-compiler-tx") == "unknown"
    assert cpu_attention._native_target("no-such-compiler-tx").startswith("cpu: ")


def test_the_key_holds_the_compiler_version_and_the_native_target(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_compiler_version", lambda cxx: "gcc version 12.2.0")
    monkeypatch.setattr(cpu_attention, "_native_target", lambda cxx: "-march=znver3 -mavx512f")
    base = cpu_attention.library_path("g++")
    assert cpu_attention.library_path("g++") == base
    monkeypatch.setattr(cpu_attention, "_compiler_version", lambda cxx: "gcc version 13.1.0")
    newer = cpu_attention.library_path("g++")
    monkeypatch.setattr(cpu_attention, "_native_target", lambda cxx: "-march=haswell -mavx2")
    other_cpu = cpu_attention.library_path("g++")
    assert len({base, newer, other_cpu}) == 3


def _fake_compiler(monkeypatch, tmp_path, run):
    monkeypatch.setenv("TX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: "fake-cxx")
    monkeypatch.setattr(cpu_attention, "_compiler_version", lambda cxx: "fake 1.0")
    monkeypatch.setattr(cpu_attention, "_native_target", lambda cxx: "-march=fake")
    monkeypatch.setattr(cpu_attention.subprocess, "run", run)


def test_concurrent_builds_leave_one_library_and_no_temporary_files(monkeypatch, tmp_path):
    both_compiling = threading.Barrier(2, timeout=30)
    outputs = []

    def run(cmd, **kwargs):
        out = pathlib.Path(cmd[cmd.index("-o") + 1])
        outputs.append(out)
        assert out.parent == tmp_path and out.name.endswith(".so.tmp")
        out.write_bytes(b"half")
        both_compiling.wait()  # each writes its own file while the other does
        time.sleep(0.05)
        out.write_bytes(b"half a library, then the rest")
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    _fake_compiler(monkeypatch, tmp_path, run)
    results, errors = [], []

    def build():
        try:
            results.append(cpu_attention.build())
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(outputs)) == 2
    target = cpu_attention.library_path("fake-cxx")
    assert results == [target, target]
    assert sorted(os.listdir(tmp_path)) == [target.name]
    assert target.read_bytes() == b"half a library, then the rest"
    assert os.stat(target).st_mode & 0o777 == 0o755


def test_a_failed_build_leaves_no_temporary_file(monkeypatch, tmp_path):
    def run(cmd, **kwargs):
        pathlib.Path(cmd[cmd.index("-o") + 1]).write_bytes(b"half")
        return types.SimpleNamespace(returncode=1, stdout="", stderr="error: no")

    _fake_compiler(monkeypatch, tmp_path, run)
    stale = tmp_path / "cpu_attention_0.killed.so.tmp"
    stale.write_bytes(b"a killed builder's")
    os.utime(stale, (0, 0))
    with pytest.raises(cpu_attention.BuildError, match="error: no"):
        cpu_attention.build()
    assert os.listdir(tmp_path) == []  # its own temporary file and the stale one are gone


def test_off_declines_every_cpu_path_naming_the_variable(monkeypatch):
    monkeypatch.setenv("TX_CPU_KERNEL", "off")

    def no_loading():
        raise AssertionError("compiled or loaded while off")

    monkeypatch.setattr(cpu_attention, "_load", no_loading)
    q = jnp.zeros((1, 2, 2, 8))
    kv = jnp.zeros((1, 4, 1, 8))
    pages = jnp.zeros((1, 2, 4, 8))
    table, lengths = jnp.zeros((1, 2), jnp.int32), jnp.full((1,), 4, jnp.int32)
    calls = [lambda: cpu_attention.attention(q, kv, kv),
             lambda: cpu_attention.cached_attention(q, kv, kv, lengths),
             lambda: cpu_attention.paged_attention(q, pages, pages, table, lengths),
             lambda: cpu_attention.paged_write_attention(q, kv, kv, pages, pages, table, lengths)]
    for call in calls:
        with pytest.raises(NotImplementedError, match="TX_CPU_KERNEL=off"):
            call()
    assert cpu_attention.available() == (
        False, ("the cpu attention kernel is off (TX_CPU_KERNEL=off; unset it or set it to 'on' "
                "to use it)"))


def test_another_value_of_the_variable_is_refused(monkeypatch):
    monkeypatch.setenv("TX_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"TX_CPU_KERNEL='fast': choose 'on' .* or 'off'"):
        cpu_attention.available()
    with pytest.raises(ValueError, match="TX_CPU_KERNEL"):
        cpu_attention.attention(jnp.zeros((1, 2, 2, 8)), jnp.zeros((1, 4, 1, 8)),
                                jnp.zeros((1, 4, 1, 8)))


_NO_COMPILER = """
import jax, numpy as np
import tx.attention as A
from tx.kernels import cpu_attention, reference
q, k, v = (jax.random.normal(jax.random.key(i), s) for i, s in
           enumerate([(1, 5, 2, 8), (1, 5, 1, 8), (1, 5, 1, 8)]))
for _ in range(2):
    got = A.attend(q, k, v, mask=A.Causal(), implementation=("cpu", "xla"))
    np.testing.assert_allclose(got, reference.attention(q, k, v, mask=A.Causal()), atol=1e-5)
print(cpu_attention.available())
"""


def test_no_compiler_warns_once_with_the_cost_and_the_fix(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "CXX": "/nonexistent", "TX_KERNEL_CACHE": str(cache)}
    env.pop("TX_CPU_KERNEL", None)
    done = subprocess.run([sys.executable, "-c", _NO_COMPILER], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "kernel is unavailable" in line]
    assert len(warned) == 1, done.stderr
    for part in ("$CXX='/nonexistent'", "falls back to the xla reference",
                 "1.3-1.7x slower", "install g++", "TX_CPU_KERNEL=off"):
        assert part in warned[0]
    assert done.stdout.startswith("(False, \"the cpu attention kernel needs a C++ compiler")
    assert not cache.exists() or not list(cache.iterdir())
