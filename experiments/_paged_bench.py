"""The paged-decode kernel rows of ``bench_decode.py``: one decode step (one new token per
sequence) over a paged KV cache, timed side by side on the same pages for

  * ``tx_pallas``: ``kernels.paged_attention`` (split-K from the tuning table);
  * ``tx_pallas_split``: the same with ``--kernel_split_k`` programs per sequence (flash-decoding);
  * ``xla``: ``kernels.reference.paged_attention`` (gather the pages, then dense attention);
  * ``jax_pallas``: JAX's own ``jax.experimental.pallas.ops.gpu.paged_attention`` (the same
    ``[K, P, L, H]`` pages; it does not scale the logits: q scaled once, outside the timing).

GB/s counts the bytes a decode step must read at least (every sequence's K and V up to its
length, plus q) over the median time; ``copy_pct`` compares it with this device's measured copy
bandwidth (``x + 1`` over a large array: one read and one write per element). Without a GPU the
Pallas kernels run in the interpreter, so their CPU times say nothing about GPU speed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tx.experiments._timing import median_seconds
from tx.kernels import reference
from tx.kernels.paged_attention import paged_attention


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    context: int      # tokens per sequence (lengths are ragged in [context / 2, context])
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str


def default_shapes(on_gpu: bool, batch: int | None, context: int | None) -> list[Shape]:
    if on_gpu:
        shapes = [Shape(32, 4096, 32, 8, 128, 16, "bfloat16"),
                  Shape(2, 32768, 32, 8, 128, 16, "bfloat16")]  # few long sequences: split-K
    else:
        shapes = [Shape(4, 512, 8, 2, 64, 16, "float32")]
    return [dataclasses.replace(s, batch=batch or s.batch, context=context or s.context)
            for s in shapes]


def make_inputs(shape: Shape, seed: int = 0):
    """Shuffled physical pages, ragged lengths; ``[K, P, L, H]`` pools with room to spare."""
    rng = np.random.default_rng(seed)
    per_seq = -(-shape.context // shape.page_size)
    num_pages = shape.batch * per_seq + 8
    tables = rng.permutation(num_pages)[:shape.batch * per_seq].reshape(shape.batch, per_seq)
    lengths = rng.integers(shape.context // 2, shape.context + 1, shape.batch)
    keys = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.dtype(shape.dtype)
    pool = (shape.num_kv_heads, num_pages, shape.page_size, shape.head_dim)
    q = jax.random.normal(keys[0], (shape.batch, shape.num_heads, shape.head_dim), dtype)
    k = jax.random.normal(keys[1], pool, dtype)
    v = jax.random.normal(keys[2], pool, dtype)
    return q, k, v, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32)


def implementations(interpret: bool, split_k: int) -> dict[str, Callable]:
    interp = True if interpret else None
    impls = {
        "tx_pallas": jax.jit(functools.partial(paged_attention, interpret=interp)),
        "tx_pallas_split": jax.jit(functools.partial(paged_attention, interpret=interp,
                                                     split_k=split_k)),
        "xla": jax.jit(reference.paged_attention),
    }
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
    except ImportError:  # pragma: no cover - older JAX without the GPU paged op
        return impls

    @jax.jit
    def jax_pallas(q, k_kplh, v_kplh, tables, lengths):
        per_block = min(8, tables.shape[1])
        while tables.shape[1] % per_block:  # it needs a divisor of the table width
            per_block //= 2
        return jax_paged.paged_attention(q, k_kplh, v_kplh, tables, lengths,
                                         pages_per_compute_block=per_block,
                                         k_splits=min(16, tables.shape[1] // per_block),
                                         interpret=interpret)

    impls["jax_pallas"] = jax_pallas
    return impls


def copy_bandwidth(on_gpu: bool, iters: int) -> float:
    """Bytes/s of ``x + 1`` over a large array (read once, written once)."""
    x = jnp.zeros(((1 << 28) if on_gpu else (1 << 24),), jnp.float32)
    return 2 * x.nbytes / median_seconds(jax.jit(lambda a: a + 1), (x,), iters)


def bytes_read(shape: Shape, lengths) -> int:
    itemsize = jnp.dtype(shape.dtype).itemsize
    kv = 2 * int(np.sum(np.asarray(lengths))) * shape.num_kv_heads * shape.head_dim
    return (kv + shape.batch * shape.num_heads * shape.head_dim) * itemsize


def run(shapes: list[Shape], *, interpret: bool, split_k: int, iters: int) -> list[dict]:
    bandwidth = copy_bandwidth(not interpret, iters)
    rows = []
    for shape in shapes:
        q, k, v, tables, lengths = make_inputs(shape)
        want = reference.paged_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                         v.astype(jnp.float32), tables, lengths)
        for name, fn in implementations(interpret, split_k).items():
            args = (q, k, v, tables, lengths)
            if name == "jax_pallas":  # it does not scale the logits
                q_scaled = (q * shape.head_dim ** -0.5).astype(q.dtype)
                args = (q_scaled, k, v, tables, lengths)
            row = {"bench": "paged_kernel", "impl": name, **dataclasses.asdict(shape),
                   "interpret": interpret and name != "xla"}
            try:
                seconds = median_seconds(fn, args, iters)
                error = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - want)))
            except Exception as e:  # a peer that cannot run this cell says why  # noqa: BLE001
                rows.append({**row, "ms": None, "why": f"{type(e).__name__}: {e}"[:160]})
                continue
            gbps = bytes_read(shape, lengths) / seconds / 1e9
            rows.append({**row, "ms": round(seconds * 1e3, 4), "gb_per_s": round(gbps, 2),
                         "copy_gb_per_s": round(bandwidth / 1e9, 1),
                         "copy_pct": round(100 * gbps * 1e9 / bandwidth, 1),
                         "max_abs_err": error})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'paged decode step':<44}{'impl':<17}{'ms':>10}{'GB/s':>9}{'% copy':>8}"
          f"{'max err':>10}")
    for r in rows:
        cell = (f"B={r['batch']} ctx={r['context']} N/K={r['num_heads']}/{r['num_kv_heads']} "
                f"H={r['head_dim']} L={r['page_size']} {r['dtype']}")
        if r["ms"] is None:
            print(f"{cell:<44}{r['impl']:<17}{'n/a':>10}  {r['why']}")
            continue
        print(f"{cell:<44}{r['impl']:<17}{r['ms']:>10.3f}{r['gb_per_s']:>9.1f}"
              f"{r['copy_pct']:>8.1f}{r['max_abs_err']:>10.2e}")
