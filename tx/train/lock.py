"""One run per workdir: an exclusive OS file lock on ``workdir/.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the holder exits
for any reason, SIGKILL included; no stale lock file needs cleaning. The file records the
holder (host, pid, start time) so a second run can name it. On several hosts only process 0
takes it (the others share the run).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import pathlib
import socket
import time

from tx.train.configs import ConfigError


class WorkdirLock:
    """``with WorkdirLock(workdir): ...``; raises :class:`ConfigError` naming the holder."""

    def __init__(self, workdir: pathlib.Path, *, take: bool = True):
        self.path, self.take, self._file = pathlib.Path(workdir) / ".lock", take, None

    def __enter__(self) -> "WorkdirLock":
        if not self.take:
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            f.close()
            raise ConfigError(
                f"workdir={str(self.path.parent)!r} is in use by {holder}, which holds its "
                f"lock {str(self.path)!r}; wait for that run to finish (or stop it), or pass "
                "another --workdir.") from None
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} (started {started})\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(f, wait_seconds: float = 2.0) -> str:
    """What the holder wrote into the lock file (``pid N on host H (started T)``). A holder
    that took the lock an instant ago may not have written yet: wait a little for it."""
    deadline = time.monotonic() + wait_seconds
    while True:
        f.seek(0)
        text = f.read().strip()
        if text.endswith(")") or time.monotonic() > deadline:
            return text or "another process"
        time.sleep(0.02)
