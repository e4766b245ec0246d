"""Strict JAX for every test: silent broadcasting or dtype promotion is a bug here.

Also keeps a test worker's compiled programs from exhausting the process's memory maps: every
XLA:CPU executable holds a few hundred mappings, Linux allows 65,530 per process
(``vm.max_map_count``), and past that LLVM fails with "Cannot allocate memory" and the worker
dies in a segfault. A worker drops JAX's caches between test modules once it holds many.

And shares compiled programs across the run: the xdist workers and every script a test starts
in a subprocess (the same tiny models, trained, killed, resumed and evaluated again and again)
read and write one persistent compilation cache, made for the run and removed after it. A hit
loads the very executable a miss would compile, so results do not change; only the compile
time goes.

And compiles with LLVM's cheap settings (``-O0``, no expensive passes): the tests check values
on tiny shapes, where compiling is most of the time and the generated code's speed does not
matter. XLA's own graph passes still run. A developer's ``XLA_FLAGS`` win where they set the
same flag; benchmarks and experiments outside the tests compile as usual.
"""
import os
import shutil
import tempfile

import jax
import pytest

from tx import host_memory

# A program's choice, as tx's scripts make it (experiments/__init__.py): before JAX runs.
host_memory.keep_freed_memory()
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

_MAPS_BEFORE_CLEARING = 30_000
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MADE_CACHE = pytest.StashKey[str]()
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_CACHE_SETTINGS = {  # the environment passes them on to workers and subprocesses
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # tiny models compile fast, often
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config):
    """The run's compilation cache and compile flags, set by the process that starts the
    workers, which inherit them (a directory the developer chose through
    ``JAX_COMPILATION_CACHE_DIR`` is used and kept)."""
    if not os.environ.get(_CACHE_ENV):
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="tx-jax-cache-")
        config.stash[_MADE_CACHE] = os.environ[_CACHE_ENV]
    for name, value in _CACHE_SETTINGS.items():
        os.environ.setdefault(name, value)
    # Read when the CPU backend starts, at the first computation (after this hook).
    flags = os.environ.get("XLA_FLAGS", "").split()
    ours = [f for f in _FAST_COMPILE if not any(x.startswith(f.split("=")[0]) for x in flags)]
    os.environ["XLA_FLAGS"] = " ".join(flags + ours)
    # This process imported jax before the variables were set.
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
    if _MADE_CACHE in config.stash:
        shutil.rmtree(config.stash[_MADE_CACHE], ignore_errors=True)


def _memory_maps() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_compiled_programs():
    yield
    if _memory_maps() > _MAPS_BEFORE_CLEARING:
        jax.clear_caches()
