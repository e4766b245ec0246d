"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events and a
terminal progress line.

On resume, :class:`MetricsLog` drops entries past the restored step (and a torn last line), so
the file holds exactly one entry per step whether or not the run was interrupted; TensorBoard
is told to purge the same steps.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from typing import Any, Callable


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The parseable lines of a JSONL file (a line torn by a kill is skipped)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to ``workdir/metrics.jsonl`` and TensorBoard scalars to ``workdir/tb``;
    with ``write=False`` (every process but the first of a multi-host run) it only keeps the
    records in memory."""

    def __init__(self, workdir: str | pathlib.Path, *, start_step: int = 0,
                 tensorboard: bool = True, write: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
        self.write_file = write
        if write:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # deferred: only runs that log need it
            self.writer = SummaryWriter(str(pathlib.Path(workdir) / "tb"),
                                        purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        record = {k: (float(v) if not isinstance(v, (int, str)) else v)
                  for k, v in record.items()}
        self.records.append(record)
        if self.write_file:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    group = "eval" if key.startswith("eval_") else "train"
                    self.writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value,
                                           record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_line(step: int, steps: int, loss: float, tokens_per_second: float,
                  seconds_per_step: float) -> str:
    eta = datetime.timedelta(seconds=round(max(0, steps - step) * seconds_per_step))
    return (f"step {step:>6d}/{steps} | loss {loss:8.4f} | {tokens_per_second:>10,.0f} tok/s "
            f"| ETA {eta}")


class Progress:
    """Formats a progress line every log interval; ``print_fn`` decides where it goes."""

    def __init__(self, steps: int, print_fn: Callable[[str], None] | None = print):
        self.steps, self.print_fn = steps, print_fn

    def __call__(self, step: int, loss: float, tokens_per_second: float,
                 seconds_per_step: float) -> None:
        if self.print_fn is not None:
            self.print_fn(progress_line(step, self.steps, loss, tokens_per_second,
                                        seconds_per_step))
