"""tx.host_memory: where the allocator settings apply, and that XLA's scratch memory is then
reused between executions instead of page-faulted back in every time."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from tx import host_memory

# A program whose [4096, 4096] fp32 intermediate (64 MiB, past glibc's largest mmap
# threshold) lives in XLA's per-execution scratch; the median of nine calls' minor page
# faults after warm-up (under a loaded CI machine one call in a few may still map afresh).
_FAULTS = textwrap.dedent("""
    import json, resource
    import tx.host_memory
    status = tx.host_memory.keep_freed_memory()  # first thing, as the scripts do
    import jax, jax.numpy as jnp
    x = jnp.ones((4096, 8), jnp.float32)
    f = jax.jit(lambda x: (x @ x.T) @ x)
    for _ in range(12):  # the first few calls still map their scratch: steady state after
        f(x).block_until_ready()
    faults = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"status": status,
                      "faults_per_call": sorted(faults)[4], "faults": faults}))
""")
_SCRATCH_PAGES = 4096 * 4096 * 4 // 4096


def _faults(setting: str) -> dict:
    env = dict(os.environ, TX_HOST_MALLOC=setting)
    done = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scratch_memory_is_reused_between_executions():
    kept = _faults("keep")
    if kept["status"] != "kept":
        pytest.skip(f"the settings do not apply on this machine: {kept['status']}")
    system = _faults("system")
    assert system["status"] == "TX_HOST_MALLOC=system"
    # Without the settings every call maps its 64 MiB scratch afresh and faults it in (if
    # XLA ever keeps it, this control fails: tx.host_memory is then no longer needed).
    assert system["faults_per_call"] > 0.5 * _SCRATCH_PAGES, system
    assert kept["faults_per_call"] < 0.05 * _SCRATCH_PAGES, kept


@pytest.mark.parametrize("env, plugins, platform, reason", [
    ({}, [], "linux", None),
    ({"JAX_PLATFORMS": "cpu"}, ["xla_cuda12"], "linux", None),  # CPU named first: it runs there
    ({"TX_HOST_MALLOC": "keep"}, [], "linux", None),
    ({"TX_HOST_MALLOC": "system"}, [], "linux", "TX_HOST_MALLOC=system"),
    ({}, [], "darwin", "platform darwin (glibc only)"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], "linux", "JAX_PLATFORMS=cuda,cpu"),
    ({}, ["xla_cuda12", "libtpu"], "linux", "accelerator plugins installed: libtpu, xla_cuda12"),
])
def test_settings_apply_where_jax_runs_on_the_cpu_under_glibc(env, plugins, platform, reason):
    assert host_memory.skip_reason(env, plugins, platform) == reason


def test_a_bad_setting_names_the_variable_and_its_choices():
    with pytest.raises(ValueError, match=r"TX_HOST_MALLOC='always' is not one of \('keep', "
                                         r"'system'\)"):
        host_memory.skip_reason({"TX_HOST_MALLOC": "always"}, [], "linux")


def test_import_applied_the_settings_once_and_reports_them():
    # The test process imported tx first (conftest), on a CPU-only machine with glibc.
    status = host_memory.keep_freed_memory()
    assert status == host_memory.keep_freed_memory()  # decided once per process
    assert status == "kept" or host_memory.skip_reason(os.environ, host_memory.
                                                       accelerator_plugins(), sys.platform)


def test_importing_tx_changes_nothing_process_wide():
    """The library leaves malloc alone; the scripts (experiments/__init__.py) set it."""
    code = ("import sys, tx, tx.flags, tx.models, tx.train.loop, tx.inference; "
            "m = sys.modules.get('tx.host_memory'); print(m is None or m._applied is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    script = ("import sys, tx.experiments, tx.host_memory; "
              "print(tx.host_memory._applied is not None)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "True"


def test_constraints_resolve_from_the_default_index():
    """No local version label (``torch==2.13.0+cpu``): the default index serves none, and
    PEP 440 lets a local build satisfy the plain pin where one is present."""
    root = pathlib.Path(__file__).resolve().parents[2]
    pins = [line.split("#")[0].strip() for line in (root / "constraints.txt").read_text()
            .splitlines()]
    assert [p for p in pins if "+" in p] == []
