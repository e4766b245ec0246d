"""Helpers shared by the datasets: per-step random generators, split hashing, argument checks.

Every dataset's ``batch(step)`` draws from ``step_rng(seed, step, ...)`` only, so a batch is a pure
function of its arguments and a resumed run needs nothing but the step to continue the same order.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "eval")
# One example in EVAL_BUCKETS (by content hash) belongs to the eval split of a synthetic task.
EVAL_BUCKETS = 8


def step_rng(seed: int, step: int, *salt: int) -> np.random.Generator:
    """A generator determined by ``(seed, step, *salt)`` alone (no global state)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, *salt])))


def row_hash(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of an integer array ``[n, ...]``, stable across runs/machines."""
    rows = np.asarray(rows)
    flat = rows.reshape(rows.shape[0], -1).astype(np.uint64)
    weights = np.random.Generator(np.random.PCG64(0x7E5)).integers(
        1, 2**63, size=flat.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (flat * weights).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return h


def in_split(rows: np.ndarray, split: str) -> np.ndarray:
    """Boolean ``[n]``: which rows belong to ``split`` (disjoint by content)."""
    is_eval = row_hash(rows) % np.uint64(EVAL_BUCKETS) == 0
    return is_eval if split == "eval" else ~is_eval


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    return split
