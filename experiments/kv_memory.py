"""KV cache memory of a model: a table over storage dtypes, contiguous and paged, and the
largest batch that fits a memory budget (``tx.inference.kv_cache_bytes``).

  tx-kv-memory --config=configs/gpt2_small.py --batch=8 --context=4096 --memory_gb=80
  tx-kv-memory --hf=/ckpt/llama --batch=1 --context=32768 --page_size=16
  python experiments/kv_memory.py --config=configs/decoder_lm.py --config.model.attention=gqa

The model comes from a config file (its ``model`` section, flags included) or a Hugging Face
checkpoint's ``config.json`` (no weights are read). Prints the table, then one JSON line. An
encoder that shortens its rows (Funnel) has no cache; its per-block lengths are printed instead:

  tx-kv-memory --config=configs/encoder_mlm.py --context=128 --config.model.funnel_blocks=2,2 \
      --config.model.num_layers=4 --config.model.positions=none --config.model.pre_norm=false \
      --config.model.embed_norm=true --config.model.attention_bias=true \
      --config.model.mlp_bias=true --config.model.head_bias=true
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from tx.experiments import _cli
from tx.inference import memory
from tx.train import configs as configs_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_HF = flags.DEFINE_string("hf", None, "A Hugging Face checkpoint directory (its config.json).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_CONTEXT = flags.DEFINE_integer("context", 2048, "Tokens per sequence (prompt + generated).")
_MEMORY = flags.DEFINE_float("memory_gb", 80.0, "Memory for the KV cache, in GiB (2**30 B).")
_PAGE = flags.DEFINE_integer("page_size", 16, "Tokens per page of the paged rows.")

DTYPES = ("float32", "bfloat16", "int8", "int4")
_GIB = 2 ** 30


def model_config():
    if (_CONFIG.value is None) == (_HF.value is None):
        raise ValueError(f"--config={_CONFIG.value and '...'} --hf={_HF.value!r}: give exactly "
                         "one of them (a configs/*.py file or a checkpoint directory).")
    if _HF.value:
        from tx.interop import hf
        return hf.config_from_hf(_HF.value)
    return configs_lib.resolve(_CONFIG.value).model


def rows(config, batch: int, context: int, memory_gb: float, page_size: int) -> list[dict]:
    out = []
    for cache, page in (("contiguous", None), ("paged", page_size)):
        for dtype in DTYPES:
            kv = memory.kv_storage_of(dtype, page)
            total = memory.kv_cache_bytes(config, batch, context, dtype=kv, page_size=page)
            scheme = dtype if dtype != "int4" else ("int4 KIVI" if page else "int4/token")
            out.append(dict(cache=cache, page_size=page, dtype=scheme, bytes=total,
                            bytes_per_token=round(total / (batch * context), 1),
                            gib=round(total / _GIB, 4),
                            max_batch=memory.largest_batch(config, context, memory_gb * _GIB,
                                                           dtype=kv, page_size=page)))
    return out


def print_table(table: list[dict], *, batch: int, context: int, memory_gb: float) -> None:
    print(f"KV cache for batch={batch} x context={context}; max batch within {memory_gb:g} GiB")
    print(f"{'cache':<11}{'page':>5}  {'dtype':<11}{'bytes/token':>12}{'GiB':>11}"
          f"{'max batch':>11}")
    for r in table:
        print(f"{r['cache']:<11}{r['page_size'] or '-':>5}  {r['dtype']:<11}"
              f"{r['bytes_per_token']:>12,.1f}{r['gib']:>11.4f}{r['max_batch']:>11,}")


def print_shapes(shapes: dict[str, int], *, context: int) -> None:
    """An encoder that shortens its rows keeps no KV cache: its per-block lengths instead."""
    print(f"no KV cache (an encoder); attention per block at context={context}:")
    for shape, layers in shapes.items():
        print(f"  {shape} ({layers} layer{'s' * (layers != 1)})")


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors(ValueError, FileNotFoundError):
        for name, value in (("batch", _BATCH.value), ("context", _CONTEXT.value),
                            ("page_size", _PAGE.value)):
            if value < 1:
                raise ValueError(f"--{name}={value} must be >= 1.")
        if not _MEMORY.value > 0:
            raise ValueError(f"--memory_gb={_MEMORY.value} must be > 0.")
        config = model_config()
        shapes = memory.attention_shapes(config, _CONTEXT.value)
        if shapes is not None and not getattr(config.head, "generates", False):
            print_shapes(shapes, context=_CONTEXT.value)
            print(json.dumps({"context": _CONTEXT.value, "kv_cache_bytes": 0,
                              "attention_shapes": shapes}))
            return
        table = rows(config, _BATCH.value, _CONTEXT.value, _MEMORY.value, _PAGE.value)
    print_table(table, batch=_BATCH.value, context=_CONTEXT.value, memory_gb=_MEMORY.value)
    print(json.dumps({"batch": _BATCH.value, "context": _CONTEXT.value,
                      "memory_gb": _MEMORY.value, "rows": table}))


def cli() -> None:
    """The console entry point (``tx-kv-memory``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
