"""Strict JAX for every test: silent broadcasting or dtype promotion is a bug here.

Also keeps a test worker's compiled programs from exhausting the process's memory maps: every
XLA:CPU executable holds a few hundred mappings, Linux allows 65,530 per process
(``vm.max_map_count``), and past that LLVM fails with "Cannot allocate memory" and the worker
dies in a segfault. A worker drops JAX's caches between test modules once it holds many.
"""
import os

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

_MAPS_BEFORE_CLEARING = 30_000


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
