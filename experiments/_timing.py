"""The one timing rule every benchmark here uses: a first call compiles and warms up, then the
median of ``iters`` timed calls, each waited on with ``block_until_ready``."""

import statistics
import time

import jax


def median_seconds(fn, args=(), iters: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
