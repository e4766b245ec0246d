"""Speed against sequence length: where linear attention overtakes softmax.

For each attention variant (a model config) and each sequence length ``T`` this measures

* training: seconds per token of the training forward and backward pass (loss and
  gradients; the optimizer update costs the same at every length and is left out) on
  ``max(1, train_tokens // T)`` sequences of ``T`` random tokens;
* decoding: seconds per generated token, one sequence, greedy, with a cache sized for ``T``
  tokens and filled to ``T - decode_tokens``; ``decode_tokens`` steps are timed together;
* memory: KV-cache (softmax) or state (FAVOR+) bytes per token at ``T``, from
  :func:`tx.inference.kv_cache_bytes`.

The weights are untrained (speed does not depend on them). Each function is compiled ahead of
time (compilation is not timed), then timed as the median of ``repeats`` calls, fewer once
``max_seconds`` are spent (a full-softmax step at 8k tokens takes many seconds on a CPU).

:func:`run` writes ``crossover.md`` and ``crossover.png`` (time per token against ``T``, one
line per variant, log-log) and returns the rows and the crossover lengths: the shortest
measured ``T`` from which ``versus[0]``'s time per token stays below ``versus[1]``'s
(None: not up to the longest length measured). The ablation runner calls it for a config
with a ``crossover`` section (``configs/ablation.py:linear``).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tx import flags as flags_lib
from tx import models
from tx.flags import ModelFlags
from tx.inference import generation, kv_cache_bytes
from tx.research import plots
from tx.train import configs as configs_lib
from tx.train.losses import loss_fn

# What a crossover section holds (configs/ablation.py:linear sets them).
DEFAULTS = dict(
    lengths=(256, 512, 1024, 2048, 4096, 8192),  # sequence lengths T
    train_tokens=2048,  # tokens per timed training pass (batch: train_tokens // T, at least 1)
    decode_tokens=64,  # decode steps per timed call
    repeats=5,  # timed calls per figure (median) ...
    max_seconds=1.5,  # ... fewer once this much time is spent (at least one call)
    versus=("favor", "full"),  # crossover of versus[0]'s time per token below versus[1]'s
)


def section(model: ModelFlags, **changes) -> ml_collections.ConfigDict:
    """A ``config.crossover`` section: the speed model's flags (each variant's ``model``
    changes apply on top) and the :data:`DEFAULTS` updated by ``changes``."""
    unknown = sorted(set(changes) - set(DEFAULTS))
    if unknown:
        raise configs_lib.ConfigError(f"crossover fields {unknown} do not exist; known: "
                                      f"{sorted(DEFAULTS)}")
    return ml_collections.ConfigDict(dict(model=configs_lib.model_dict(model),
                                          **{**DEFAULTS, **changes}))


def check(cfg: ml_collections.ConfigDict, variants: Mapping[str, ModelFlags]) -> None:
    """Fails (naming the field) on a section that cannot run, before anything is timed."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"model"})
    if unknown:
        raise configs_lib.ConfigError(f"crossover fields {unknown} do not exist; known: "
                                      f"{sorted(DEFAULTS) + ['model']}")
    versus = tuple(cfg.versus)
    missing = [v for v in versus if v not in variants]
    if len(versus) != 2 or missing:
        raise configs_lib.ConfigError(f"crossover.versus={versus}: name two variants of "
                                      f"{sorted(variants)} (missing: {missing}).")
    for name in ("train_tokens", "decode_tokens", "repeats"):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 1:
            raise configs_lib.ConfigError(f"crossover.{name}={cfg[name]!r}: must be a "
                                          "positive integer.")
    lengths = tuple(cfg.lengths)
    if not lengths or any(not isinstance(t, int) or t <= cfg.decode_tokens for t in lengths):
        raise configs_lib.ConfigError(f"crossover.lengths={lengths}: give integers longer "
                                      f"than crossover.decode_tokens={cfg.decode_tokens}.")


def seconds_per_call(jitted, args: tuple, repeats: int, max_seconds: float) -> float:
    """Median seconds of up to ``repeats`` calls of ``jitted(*args)``, compiled ahead of time
    (compilation is not timed; no untimed warm-up call, which at long lengths would cost as
    much as a timed one); stops early once ``max_seconds`` have been spent timing (at least
    one call)."""
    compiled = jitted.lower(*args).compile()
    times = []
    while len(times) < repeats and (not times or sum(times) < max_seconds):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tokens(model: nnx.Module, batch: int, length: int) -> jax.Array:
    return jax.random.randint(jax.random.key(0), (batch, length), 0, model.config.vocab_size,
                              jnp.int32)


def train_seconds_per_token(model: nnx.Module, length: int, tokens: int, repeats: int,
                            max_seconds: float) -> float:
    """Seconds per token of a training forward and backward pass (the loss and its gradients,
    dropout and FAVOR+ redraws as in training). The optimizer update is left out: its cost per
    step depends on the parameters only, not on the attention or the length."""
    batch = max(1, tokens // length)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_and_grads(params, rest, data):
        def loss(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.train()
            return loss_fn(model, data)[0]
        return jax.value_and_grad(loss)(params)

    inputs = _tokens(model, batch, length)
    data = {"inputs": inputs, "targets": inputs, "weights": jnp.ones(inputs.shape, jnp.float32)}
    seconds = seconds_per_call(jax.jit(loss_and_grads), (params, rest, data), repeats,
                               max_seconds)
    return seconds / (batch * length)


def _decoder(graphdef, steps: int):
    """``decode(state, token_b1)``: ``steps`` greedy decoding steps in one jitted loop."""

    def body(_, carry):
        state, token_b1 = carry
        model = nnx.merge(graphdef, state, copy=True)
        token_b1 = model(token_b1)[:, -1].argmax(-1).astype(jnp.int32)[:, None]
        return nnx.state(model), token_b1

    return jax.jit(lambda state, token_b1: jax.lax.fori_loop(0, steps, body,
                                                             (state, token_b1))[1])


def decode_seconds_per_token(model: nnx.Module, length: int, steps: int, repeats: int,
                             max_seconds: float) -> float:
    """Seconds per decoded token with the contiguous caches ``generate`` uses (a full KV
    cache, a rolling one for windows, a constant state for FAVOR+ layers) sized for
    ``length`` tokens and marked filled to ``length - steps``. The contents are zeros: a
    step costs the same whatever the values, so no prefill is compiled or run."""
    model = nnx.clone(model)  # the caches go on a copy
    model.eval()
    model.init_cache(1, length)
    for cache in generation.caches(model):
        cache.index.set_value(jnp.asarray(length - steps, jnp.int32))
    graphdef, state = nnx.split(model)
    decode = _decoder(graphdef, steps)
    token = _tokens(model, 1, 1)
    return seconds_per_call(decode, (state, token), repeats, max_seconds) / steps


def measure(variants: Mapping[str, ModelFlags], cfg: ml_collections.ConfigDict, *,
            print_fn: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """One row per (variant, length): time per token for training and decoding, tokens/s,
    and the cache bytes per token."""
    rows = []
    for name, flags in variants.items():
        model_config = flags_lib.parse(flags)
        model = models.build(model_config)  # untrained: speed does not depend on the weights
        for length in cfg.lengths:
            timing = (cfg.repeats, cfg.max_seconds)
            train = train_seconds_per_token(model, length, cfg.train_tokens, *timing)
            decode = decode_seconds_per_token(model, length, cfg.decode_tokens, *timing)
            cache = kv_cache_bytes(model_config, 1, length)
            rows.append({"variant": name, "length": length,
                         "train_us_per_token": train * 1e6, "train_tokens_per_s": 1 / train,
                         "decode_us_per_token": decode * 1e6,
                         "decode_tokens_per_s": 1 / decode,
                         "cache_bytes": cache, "cache_bytes_per_token": cache / length})
            if print_fn:
                print_fn(f"crossover {name} T={length}: train {1 / train:,.0f} tok/s, "
                         f"decode {1 / decode:,.0f} tok/s, cache {cache / length:,.0f} B/tok")
    return rows


def crossover_length(rows: list[dict], key: str, versus: tuple[str, str]) -> int | None:
    """The shortest length from which ``versus[0]``'s ``key`` (a time per token) stays below
    ``versus[1]``'s at every longer measured length; None if it is not below at the longest."""
    fast, slow = ({r["length"]: r[key] for r in rows if r["variant"] == v} for v in versus)
    found = None
    for length in sorted(set(fast) & set(slow), reverse=True):
        if fast[length] >= slow[length]:
            break
        found = length
    return found


def crossovers(rows: list[dict], versus) -> dict[str, int | None]:
    versus = tuple(versus)
    return {kind: crossover_length(rows, f"{kind}_us_per_token", versus)
            for kind in ("train", "decode")}


def _grid(rows: list[dict], key: str, fmt: str) -> list[str]:
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    value = {(r["variant"], r["length"]): r[key] for r in rows}
    lines = ["| variant | " + " | ".join(f"T={t}" for t in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    lines += ["| " + name + " | " + " | ".join(fmt.format(value[name, t]) if (name, t) in value
                                               else "-" for t in lengths) + " |"
              for name in names]
    return lines


def describe(length: int | None, rows: list[dict]) -> str:
    return f"{length:,}" if length is not None else \
        f"none up to {max(r['length'] for r in rows):,}"


def table(rows: list[dict], found: Mapping[str, int | None], versus) -> str:
    """Markdown: training and decode tokens/s and cache bytes per token against length, and
    the crossover lengths."""
    out = ["Training tokens/s (forward + backward; untrained weights):", ""]
    out += _grid(rows, "train_tokens_per_s", "{:,.0f}")
    out += ["", "Decode tokens/s (one sequence, greedy, context of T tokens):", ""]
    out += _grid(rows, "decode_tokens_per_s", "{:,.0f}")
    out += ["", "KV-cache or state bytes per token at T (fp32, one sequence):", ""]
    out += _grid(rows, "cache_bytes_per_token", "{:,.0f}")
    # Per sequence: a recurrent layer's constant state against softmax's growing cache.
    out += ["", "KV-cache or state bytes per sequence at T (fp32):", ""]
    out += _grid(rows, "cache_bytes", "{:,.0f}")
    out += ["", f"Crossover ({versus[0]} faster per token than {versus[1]} from this length "
            f"on): training {describe(found['train'], rows)}; "
            f"decode {describe(found['decode'], rows)}."]
    return "\n".join(out)


def plot(rows: list[dict], path: str | pathlib.Path, found: Mapping[str, int | None]
         ) -> pathlib.Path:
    """Time per token against sequence length, log-log: training and decoding side by side,
    one line per variant; a dotted vertical line marks a crossover."""
    plt = plots._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    for ax, kind in zip(axes, ("train", "decode")):
        for i, name in enumerate(names):
            points = sorted((r["length"], r[f"{kind}_us_per_token"]) for r in rows
                            if r["variant"] == name)
            ax.plot(*zip(*points), marker="o", ms=3, color=f"C{i % 10}", label=name)
        if found.get(kind) is not None:
            ax.axvline(found[kind], color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{t:,}" for t in lengths])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("µs per token")
        ax.set_title("training (forward + backward)" if kind == "train" else
                     "decoding (one sequence)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(variants: Mapping[str, ModelFlags], cfg: ml_collections.ConfigDict,
        workdir: str | pathlib.Path, *, print_fn: Callable[[str], None] | None = print
        ) -> dict[str, Any]:
    """Measures every variant at every length; writes ``crossover.md``, ``crossover.jsonl``
    (one line per row) and ``crossover.png`` to ``workdir``; returns ``{"rows", "crossover"}``."""
    workdir = pathlib.Path(workdir)
    check(cfg, variants)
    versus = tuple(cfg.versus)
    rows = measure(variants, cfg, print_fn=print_fn)
    found = crossovers(rows, versus)
    (workdir / "crossover.md").write_text(table(rows, found, versus) + "\n")
    (workdir / "crossover.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, workdir / "crossover.png", found)
    return {"rows": rows, "crossover": found, "versus": list(versus)}


def variant_flags(model: ml_collections.ConfigDict, lengths) -> ModelFlags:
    """A variant's speed-model flags, with positions tables long enough for every length."""
    flags = configs_lib.model_flags(model)
    return flags.replace(max_len=max(flags.max_len, max(lengths)))
