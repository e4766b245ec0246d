"""The score-modifier rows of ``bench_attention.py --suites=score_mods``.

For every cell and modifier it times, on the same inputs and mask, forward and forward+backward
of
  * ``tx_pallas`` with the modifier (``flash_attention(score_mod=...)``);
  * ``tx_pallas`` without it: the baseline, timed once per cell; ``x base`` is a row's time
    over the baseline's for the same pass, so for the kernel rows it is the modifier's cost;
  * ``xla`` via ``dense_bias``: ``reference.attention(bias=...)`` with the modifier built as a
    ``[1, N, T, S]`` fp32 bias before the timing (ALiBi and T5 are additive), or, for a
    modifier with no dense-bias form (SoftCap, Sinks, ScoreFn), via ``score_mod``:
    ``reference.attention(score_mod=...)``.
Gradients are taken in q, k and v only: the bias and the modifier's parameters are constants,
so the xla rows leave out the bias gradient a learned T5 table would need. Each row's output
is checked against an fp32 reference with the modifier before it is timed; a row out of
tolerance is reported as ``mismatch`` and not timed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tx.kernels import score_mods as sm

# (atol, rtol) of the check before timing: max|out - ref| <= atol + rtol * max|ref|.
TOL = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 2e-2), "float16": (5e-3, 5e-3)}


def _distance_penalty(score, batch, head, q_pos, kv_pos):
    """The ScoreFn row: a per-head scaled distance penalty ``-0.01 * (head + 1) * |q - kv|``."""
    del batch
    slope = 0.01 * (head + 1).astype(jnp.float32)
    distance = jnp.abs(q_pos - kv_pos).astype(jnp.float32)
    return score - jnp.broadcast_to(slope * distance, score.shape)


def modifiers(num_heads: int, seed: int = 0) -> dict[str, sm.ScoreMod]:
    """The benchmarked modifiers by name, with fixed random parameters."""
    table_key, sink_key = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "alibi": sm.ALiBi(jnp.asarray(sm.alibi_slopes(num_heads), jnp.float32)),
        "t5_32": sm.T5Bias(0.5 * jax.random.normal(table_key, (32, num_heads), jnp.float32),
                           num_buckets=32, max_distance=128),
        "softcap50": sm.SoftCap(50.0),
        "sinks": sm.Sinks(jax.random.normal(sink_key, (num_heads,), jnp.float32)),
        "score_fn": sm.ScoreFn(_distance_penalty),
    }


NAMES = ("alibi", "t5_32", "softcap50", "sinks", "score_fn")  # the keys of modifiers()


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dense(mod, t: int, s: int) -> jax.Array:
    q_pos = jnp.arange(t, dtype=jnp.int32)[:, None] + (s - t)  # bottom-right aligned
    kv_pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    if isinstance(mod, sm.ALiBi):
        distance = jnp.abs(q_pos - kv_pos).astype(jnp.float32)[None]                 # [1, T, S]
        return (-jnp.asarray(mod.slopes, jnp.float32)[:, None, None] * distance)[None]
    bucket = sm.t5_bucket(kv_pos - q_pos, num_buckets=mod.num_buckets,
                          max_distance=mod.max_distance, bidirectional=mod.bidirectional)
    table_nb = jnp.asarray(mod.table, jnp.float32).T                             # [N, buckets]
    return jnp.take(table_nb, bucket, axis=1)[None]                              # [1, N, T, S]


def dense_bias(mod: sm.ScoreMod, t: int, s: int) -> jax.Array:
    """The ``[1, N, T, S]`` fp32 bias equal to an additive modifier at the default positions;
    ``NotImplementedError`` for a modifier that is not an additive bias."""
    if not isinstance(mod, (sm.ALiBi, sm.T5Bias)):
        raise NotImplementedError(f"{type(mod).__name__} has no dense-bias form")
    return _dense(mod, t, s)


def within_tolerance(err: float, ref: np.ndarray, dtype: str) -> tuple[bool, float]:
    atol, rtol = TOL[dtype]
    bound = atol + rtol * float(np.max(np.abs(ref)))
    return err <= bound, bound


def format_table(rows, interpret: bool) -> str:
    header = (f"{'cell':<58} {'score_mod':<10} {'impl':<10} {'via':<11} {'pass':<8} "
              f"{'ms':>10} {'x base':>7} {'max_err':>9}")
    lines = ["score modifiers: x base = ms / tx_pallas without a modifier (same cell and pass)"]
    if interpret:
        lines.append("note: interpret mode (no GPU): the Pallas rows ran in the Pallas "
                     "interpreter on CPU, so these times and ratios say nothing about GPU "
                     "speed; run this suite on a GPU.")
    lines += [header, "-" * len(header)]
    for r in rows:
        head = (f"{r['cell']:<58} {r['score_mod']:<10} {r['impl']:<10} {r['via']:<11} "
                f"{r['pass']:<8} ")
        err = r.get("max_err")
        err = f"{err:9.2e}" if err is not None else f"{'':>9}"
        if r["status"] == "ok":
            ratio = f"{r['ratio']:7.2f}" if r.get("ratio") is not None else f"{'':>7}"
            lines.append(f"{head}{r['ms']:>10.3f} {ratio} {err}")
        else:
            lines.append(f"{head}{r['status']:>10} {'':>7} {err} ({r['reason'][:60]})")
    return "\n".join(lines)
