"""pytest plugin of the GPU run's kernel-test section (``-p pytest_gpu_run``).

* One JSON line per test outcome, appended to ``$GPU_RUN_JSONL`` and flushed at once, so a
  run killed at its time limit still says which tests passed or failed.
* ``-x`` per unit (a path or node id given on the command line, e.g. one test file): after a
  failure the rest of that unit is skipped and the next unit runs, so one broken kernel does
  not hide the others' results.
* Fair shares of ``$GPU_RUN_DEADLINE`` (Unix time): each unit, when it starts, gets an equal
  share of the time left among the units not yet finished (what a fast unit leaves goes to
  the later ones); past its share the rest of the unit is skipped. Every kernel gets compiled
  and tested within the section's budget, none gets all of it. No test starts after the
  deadline.
* ``$GPU_RUN_LIMIT_PER_FILE``: keep only the first N tests of each file (the CPU dry run).

Tests the plugin skips are not listed one by one: a ``unit`` row per unit counts them.
"""

from __future__ import annotations

import json
import os
import time

import pytest

SECTION = "kernel_tests"
_SKIP = "gpu_run: "
_state = {"units": [], "unit_of": {}, "current": None, "unit_end": None, "failed": set(),
          "counts": {}, "stopped": None}


def _write(row: dict) -> None:
    path = os.environ.get("GPU_RUN_JSONL")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"section": SECTION, **row}, sort_keys=True) + "\n")


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _unit(config, nodeid: str) -> str:
    """The command-line argument that selected ``nodeid`` (its file if none matches)."""
    for arg in config.args:
        arg = arg.replace(os.sep, "/")
        if nodeid == arg or nodeid.startswith(arg + "::") or nodeid.startswith(arg + "/"):
            return arg
    return _file(nodeid)


def pytest_collection_modifyitems(session, config, items):
    limit = int(os.environ.get("GPU_RUN_LIMIT_PER_FILE", "0") or 0)
    if limit > 0:
        kept, dropped, seen = [], [], {}
        for item in items:
            n = seen.get(_file(item.nodeid), 0)
            (kept if n < limit else dropped).append(item)
            seen[_file(item.nodeid)] = n + 1
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
            _write({"event": "limited", "per_file": limit, "deselected": len(dropped)})
    for item in items:
        unit = _unit(config, item.nodeid)
        _state["unit_of"][item.nodeid] = unit
        if unit not in _state["units"]:
            _state["units"].append(unit)
            _state["counts"][unit] = {"tests": 0, "ran": 0, "skipped_after_failure": 0,
                                      "skipped_share_spent": 0}
        _state["counts"][unit]["tests"] += 1


def pytest_collection_finish(session):
    _write({"event": "collected", "tests": len(session.items), "units": _state["units"]})


def pytest_runtest_setup(item):
    unit = _state["unit_of"].get(item.nodeid, _file(item.nodeid))
    deadline = float(os.environ.get("GPU_RUN_DEADLINE", "0") or 0)
    now = time.time()
    if unit != _state["current"]:
        _state["current"] = unit
        left = [u for u in _state["units"][_state["units"].index(unit):]] \
            if unit in _state["units"] else [unit]
        _state["unit_end"] = now + (deadline - now) / len(left) if deadline else None
    if deadline and now > deadline:
        _state["stopped"] = "section budget spent"
        item.session.shouldstop = "gpu_run: section budget spent"
        pytest.skip(_SKIP + "section budget spent")
    if unit in _state["failed"]:
        _state["counts"][unit]["skipped_after_failure"] += 1
        pytest.skip(_SKIP + "an earlier test of this unit failed (-x per unit)")
    if _state["unit_end"] and now > _state["unit_end"]:
        _state["counts"][unit]["skipped_share_spent"] += 1
        pytest.skip(_SKIP + "this unit's share of the budget is spent")
    _state["counts"][unit]["ran"] += 1


def pytest_runtest_logreport(report):
    if report.when != "call" and report.passed:
        return
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
        if message.startswith("Skipped: " + _SKIP) or message.startswith(_SKIP):
            return  # counted in the unit rows
    unit = _state["unit_of"].get(report.nodeid, _file(report.nodeid))
    row = {"nodeid": report.nodeid, "file": _file(report.nodeid), "unit": unit,
           "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if report.failed:
        _state["failed"].add(unit)
        text = report.longreprtext or ""
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or \
            text.splitlines()[-5:]
        row["message"] = "\n".join(lines)[-1500:]
    elif message:
        row["message"] = message[:300]
    _write(row)


def pytest_sessionfinish(session, exitstatus):
    for unit in _state["units"]:
        _write({"event": "unit", "unit": unit, **_state["counts"][unit]})
    counts = {}
    stats = session.config.pluginmanager.get_plugin("terminalreporter")
    if stats is not None:
        for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
            counts[key] = len(stats.stats.get(key, []))
    row = {"event": "finished", "exitstatus": int(exitstatus), "counts": counts,
           "collected": session.testscollected, "stopped": _state["stopped"]}
    _write(row)
    print("\n" + json.dumps({"section": SECTION, **row}, sort_keys=True))
