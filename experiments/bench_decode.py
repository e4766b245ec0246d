"""Decode speed: tokens/s generating N tokens from a P-token prompt, KV cache vs recompute;
then one paged decode step of our Pallas kernel against its reference and JAX's own Pallas
paged attention, with GB/s read and % of the measured copy bandwidth (``_paged_bench.py``).

  python experiments/bench_decode.py                       # 256 new tokens, 128-token prompt
  python experiments/bench_decode.py --new_tokens=16 --prompt=8 --layers=1   # smoke size
  python experiments/bench_decode.py --nokernel            # generation rows only
  python experiments/bench_decode.py --kv_dtype=int8       # also int8 KV cache rows

Prints tables and one JSON line per row. Compile time is excluded (one warm-up call with
the same shapes first); each figure is the median of ``--repeats`` timed calls.
"""

from __future__ import annotations

import json
import platform

import jax
from absl import app, flags

from tx.experiments import _paged_bench
from tx.experiments._timing import median_seconds
from tx import models
from tx import flags as tx_flags
from tx.flags import ModelFlags
from tx.inference import generate

_NEW = flags.DEFINE_integer("new_tokens", 256, "Tokens to generate.")
_PROMPT = flags.DEFINE_integer("prompt", 128, "Prompt length.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences generated together.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers of the default small model.")
_ATTENTION = flags.DEFINE_string("attention", "gqa", "Attention preset.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row (median reported).")
_KERNEL = flags.DEFINE_bool("kernel", True, "Also time the paged decode kernel and its peers.")
_K_BATCH = flags.DEFINE_integer("kernel_batch", None, "Kernel rows: sequences (default: table).")
_K_CONTEXT = flags.DEFINE_integer("kernel_context", None, "Kernel rows: tokens per sequence.")
_K_SPLIT = flags.DEFINE_integer("kernel_split_k", 4, "Kernel rows: split-K programs.")
_KV_DTYPE = flags.DEFINE_string("kv_dtype", "auto", "KV cache storage of extra rows: int8, "
                                "int4 (KIVI, paged only) or int4_per_token; auto: none.")


def _time(fn) -> float:
    return median_seconds(lambda: fn().tokens, (), _REPEATS.value)


def run() -> list[dict]:
    cfg = ModelFlags(vocab_size=264, d_model=256, num_heads=8, num_layers=_LAYERS.value,
                      d_ff=1024, attention=_ATTENTION.value,
                      max_len=_PROMPT.value + _NEW.value)
    model = models.build(tx_flags.parse(cfg))
    prompt = jax.random.randint(jax.random.key(0), (_BATCH.value, _PROMPT.value), 8, 264)
    rows = []
    caches = [(name, "auto") for name in ("contiguous", "paged", "none")]
    kv = tx_flags.kv_storage(_KV_DTYPE.value)  # a bad name fails before anything runs
    if kv is not None:  # KIVI needs pages; the token-wise schemes go in both caches
        caches += [(name, _KV_DTYPE.value) for name in ("contiguous", "paged")
                   if not (kv.residual and name == "contiguous")]
    for cache, kv_dtype in caches:
        seconds = _time(lambda: generate(model, prompt, max_new_tokens=_NEW.value,
                                               cache=tx_flags.cache(cache, kv_dtype=kv_dtype)))
        rows.append({"bench": "decode", "cache": cache, "kv_dtype": kv_dtype,
                     "attention": cfg.attention,
                     "layers": cfg.num_layers, "d_model": cfg.d_model, "batch": _BATCH.value,
                     "prompt": _PROMPT.value, "new_tokens": _NEW.value,
                     "seconds": round(seconds, 4),
                     "tokens_per_s": round(_BATCH.value * _NEW.value / seconds, 1)})
    speedup = rows[0]["tokens_per_s"] / rows[2]["tokens_per_s"]  # contiguous vs none
    for row in rows:
        row.update(cache_speedup=round(speedup, 2), **_versions())
    return rows


def _versions() -> dict:
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                python=platform.python_version())


def kernel_rows() -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    shapes = _paged_bench.default_shapes(on_gpu, _K_BATCH.value, _K_CONTEXT.value)
    rows = _paged_bench.run(shapes, interpret=not on_gpu, split_k=_K_SPLIT.value,
                            iters=_REPEATS.value)
    return [{**row, **_versions()} for row in rows]


def main(argv):
    del argv
    rows = run()
    print(f"{'cache':<12}{'kv_dtype':<16}{'tokens/s':>12}{'seconds':>10}")
    for row in rows:
        print(f"{row['cache']:<12}{row['kv_dtype']:<16}{row['tokens_per_s']:>12.1f}"
              f"{row['seconds']:>10.3f}")
    print(f"KV cache speed-up over recompute: {rows[0]['cache_speedup']}x")
    if _KERNEL.value:
        kernel = kernel_rows()
        _paged_bench.print_table(kernel)
        rows += kernel
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
