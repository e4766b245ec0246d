"""Preemption: SIGTERM or SIGINT ends a run cleanly at the next step boundary.

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM and wait a grace period before SIGKILL.
The first SIGTERM or SIGINT only raises a flag: the loop finishes the step in flight, saves a
checkpoint synchronously, flushes its metrics and raises :class:`Preempted`, which the scripts
turn into exit code :data:`EXIT_CODE`. A second signal restores the default action and
re-sends itself, so the process dies at once.
"""

from __future__ import annotations

import os
import signal
import sys

# EX_TEMPFAIL: "try again later", what a requeueing launcher should read from a preempted run.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A run stopped by a signal after saving; rerunning the same command resumes it."""

    exit_code = EXIT_CODE


class StopSignals:
    """``with StopSignals() as stop: ... if stop.requested(): ...``.

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    flag never rises and signals keep their default action."""

    def __init__(self, signals=SIGNALS):
        self.signals, self.received, self._previous = signals, None, {}

    def _handle(self, signum, frame):
        if self.received is not None:  # the second signal: leave at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: finishing this step and saving a checkpoint; "
              "send it again to exit at once", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether a stop was asked for here; :func:`agree` shares it across hosts."""
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        try:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def agree(local: bool) -> bool:
    """Whether any process asked to stop; every process gets the same answer, so all stop
    after the same step (each host's scheduler signals it at a slightly different time)."""
    import jax
    if jax.process_count() == 1:
        return local
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))
