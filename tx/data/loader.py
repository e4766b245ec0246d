"""A checkpointable iterator over any tx dataset: its whole state is the next step.

Because ``dataset.batch(step)`` is a pure function, saving ``{"step": n}`` with a checkpoint and
restoring it continues with exactly the batches an uninterrupted run would have seen. The
``get_state`` / ``set_state`` names follow grain's iterator protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Dataset(Protocol):
    task: str
    vocab_size: int

    def batch(self, step: int) -> dict[str, np.ndarray]: ...


class StepIterator:
    """``next()`` returns ``dataset.batch(step)`` and advances ``step``."""

    def __init__(self, dataset: Dataset, step: int = 0):
        self.dataset = dataset
        self.step = int(step)

    def __iter__(self) -> "StepIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.dataset.batch(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
