"""Host memory for XLA's CPU runtime: keep freed memory in the process instead of unmapping it.

XLA's CPU runtime allocates each execution's scratch buffer with ``malloc`` from its worker
threads and frees it when the execution ends. A buffer that large (254 MB for the LLaMA-shape
training step of ``experiments/bench_vs_hf.py``) is mapped fresh and unmapped again every time:
glibc gives worker threads their own arenas, and an arena that cannot hold a request falls back
to ``mmap``. Every step then page-faults its whole scratch space back in: 65,000 minor faults
and ~120 ms of kernel time per 340 ms step on a 2-core machine.

:func:`keep_freed_memory` asks glibc for one arena, no ``mmap`` allocations and no trimming
below 2 GiB of free heap, so the scratch space of one step is reused by the next (the same step:
0 faults, 340 -> 280 ms). The cost: freed memory stays with the process (up to 2 GiB of it
is kept for reuse), and threads share one arena's lock.

A program calls it first thing (tx's scripts do, through ``experiments/__init__.py``; ``import
tx`` changes nothing), because the arena choice of a thread is fixed by its first allocation:
called after JAX has run anything, it no longer reaches XLA's threads. From outside a program,
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
2147483647`` sets the same. It does nothing
where it does not apply: off glibc, when an accelerator plugin is installed (JAX would run
there, and host scratch is small), or when ``JAX_PLATFORMS`` names another platform first.
``TX_HOST_MALLOC=system`` keeps the system's settings.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h> parameters
_KEEP_BELOW = 2**31 - 1  # bytes of free heap glibc keeps before it trims (mallopt takes an int)
_ENV = "TX_HOST_MALLOC"
_CHOICES = ("keep", "system")

_applied: str | None = None  # why keep_freed_memory did or did not act, once decided


def accelerator_plugins() -> list[str]:
    """JAX's installed accelerator plugins (``jax_plugins`` packages and entry points, libtpu)."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("jax_plugins") is not None:
        import pkgutil

        import jax_plugins
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def skip_reason(env: dict, plugins: list[str], platform: str) -> str | None:
    """Why the settings should not be changed here, or None where they should."""
    choice = env.get(_ENV, "keep")
    if choice not in _CHOICES:
        raise ValueError(f"{_ENV}={choice!r} is not one of {_CHOICES}: 'keep' keeps freed host "
                         "memory for XLA's next execution, 'system' leaves malloc alone.")
    if choice == "system":
        return f"{_ENV}=system"
    if platform != "linux":
        return f"platform {platform} (glibc only)"
    platforms = [p for p in env.get("JAX_PLATFORMS", "").split(",") if p]
    if platforms:
        return None if platforms[0] == "cpu" else f"JAX_PLATFORMS={env['JAX_PLATFORMS']}"
    if plugins:
        return f"accelerator plugins installed: {', '.join(sorted(set(plugins)))}"
    return None


def keep_freed_memory() -> str:
    """Applies the settings once per process; returns what was done (``"kept"`` or why not)."""
    global _applied
    if _applied is None:
        _applied = skip_reason(os.environ, accelerator_plugins(), sys.platform) or _mallopt()
    return _applied


def _mallopt() -> str:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl and others differ in mallopt
    except (OSError, AttributeError):
        return "not glibc"
    done = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW)]
    return "kept" if all(done) else f"mallopt refused: {done}"
