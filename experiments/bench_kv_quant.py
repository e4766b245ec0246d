"""Quantised KV caches against the fp32 cache: memory, fidelity, quality and speed.

Two GQA models, every cache on the paged cache (``--page_size``):

  * ``byte_lm``: a byte LM trained on the built-in text (``configs/decoder_lm.py`` with
    ``attention=gqa``: 4 query heads, 2 K/V heads), trained here for ``--train_steps`` into a
    temporary directory, or the latest checkpoint of ``--workdir``;
  * ``hf_llama``: a random-init ``transformers`` LLaMA (8 query heads, 2 K/V heads; weights
    redrawn as ``N(0, 0.05)`` as in ``bench_vs_hf.py``, since HF's 0.02 init makes a small
    model predict nearly uniform logits), saved with ``save_pretrained`` and loaded through
    ``tx.interop.hf.load`` (``--skip_hf`` leaves it out).

For each storage, fp32, int8 (per token), int4 per token (the naive baseline) and int4 KIVI
(keys per channel over a page, values per token, the partial last page in fp32):

  * ``bytes/tok``: KV bytes one more token costs in the page pool, all layers, K and V
    (``tx.inference.kv_cache_bytes``, checked against the installed cache's arrays);
    ``eff b/tok``: bytes per token of one sequence of this run's length
    (``--prompt_len + --new_tokens``), page rounding and KIVI's fp32 partial page included;
  * teacher-forced decoding of ``--prompts`` held-out text windows (the built-in text's eval
    documents; the HF model reads the same byte ids): prefill ``--prompt_len`` tokens, then
    feed the true next tokens one at a time (one ``lax.scan``), and compare each step's
    logits with the fp32 cache's: worst and mean absolute logit error, the fraction of steps
    whose argmax (greedy next token on the same context) matches fp32's, and the cross
    entropy on the true next tokens (``eval loss``, and its delta against fp32);
  * free running: ``generate(..., strategy=Greedy())`` from the same prompts, position-wise
    token agreement with fp32's output (and the mean length of the agreeing prefix);
  * decode tokens/s of that ``generate`` call (B x new tokens / seconds; compile excluded,
    median of ``--repeats``).

  python experiments/bench_kv_quant.py                         # default: about 3-4 min on 2 cores
  python experiments/bench_kv_quant.py --workdir=/tmp/tx/lm --skip_hf
  python experiments/bench_kv_quant.py --train_steps=2 --prompts=4 --new_tokens=24 \
      --prompt_len=8 --repeats=1 --hf_layers=1 --hf_d_model=64     # smoke size

Prints a table, then one JSON line holding every row, the models and the versions.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from tx.experiments._timing import median_seconds
from tx import flags as tx_flags
from tx.data import vocab
from tx.data.text import stdlib_corpus
from tx.inference import Greedy, Paged, generate, kv_cache_bytes
from tx.inference import generation as generation_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained tx byte-LM run to load (latest "
                               "checkpoint); default: train configs/decoder_lm.py here.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 600, "Training steps when no --workdir.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 16, "Training batch when no --workdir.")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Leave out the transformers LLaMA.")
_HF_D_MODEL = flags.DEFINE_integer("hf_d_model", 256, "LLaMA hidden size.")
_HF_LAYERS = flags.DEFINE_integer("hf_layers", 4, "LLaMA layers.")
_HF_VOCAB = flags.DEFINE_integer("hf_vocab", 512, f"LLaMA vocabulary (>= "
                                 f"{vocab.BYTE_VOCAB_SIZE}: it reads the byte prompts' ids).")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Held-out windows (the batch B).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt (prefill) tokens per window.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Decode steps per window.")
_PAGE = flags.DEFINE_integer("page_size", 16, "Paged cache page size L.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed generate calls per row (median).")
_SEED = flags.DEFINE_integer("seed", 0, "Window choice and model init.")

# (row label, tx.flags.kv_storage name, tx.inference.kv_cache_bytes dtype)
STORAGES = (("fp32", "auto", "float32"), ("int8", "int8", "int8"),
            ("int4_per_token", "int4_per_token", "int4_per_token"), ("int4_kivi", "int4", "int4"))
_HF_SPREAD = 0.05


# ------------------------------------------------------------------------------- the models

_START = time.perf_counter()


def _log(line: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {line}", file=sys.stderr, flush=True)


def train_byte_lm(steps: int, batch: int, seq_len: int, workdir: str) -> tuple[nnx.Module, dict]:
    """``configs/decoder_lm.py`` with GQA (4 query heads, 2 K/V heads), trained ``steps``."""
    from tx.train import configs as configs_lib, loop
    config = configs_lib.load_file(
        pathlib.Path(__file__).resolve().parents[1] / "configs" / "decoder_lm.py")
    config.model.attention = "gqa"
    config.model.num_kv_heads = 2
    config.model.max_len = max(config.model.max_len, seq_len)
    config.data.seq_len = seq_len
    config.train.update(steps=steps, batch_size=batch, warmup_steps=min(20, max(1, steps // 10)),
                        log_every=max(1, steps // 8), eval_every=steps, checkpoint_every=steps,
                        eval_batches=2, async_checkpoints=False, seed=_SEED.value)
    summary = loop.run(config, workdir, print_fn=_log)
    model, step = loop.load_model(configs_lib.resolve(config), workdir)
    assert step == steps, (step, steps)
    info = dict(source="trained here", train_steps=steps, train_batch=batch,
                train_seq_len=seq_len, train_seconds=round(summary["wall_seconds"], 1),
                train_first_loss=round(summary["first_loss"], 4),
                train_eval_loss=round(summary["eval_loss"], 4))
    return model, info


def load_byte_lm(workdir: str) -> tuple[nnx.Module, dict]:
    from tx.experiments import _pretrained
    source = _pretrained.load_source(None, workdir)
    if source.model.config.vocab_size < vocab.BYTE_VOCAB_SIZE:
        raise ValueError(f"--workdir={workdir!r}: vocab_size={source.model.config.vocab_size} "
                         f"is below the byte vocabulary ({vocab.BYTE_VOCAB_SIZE}); give a byte "
                         "LM run (configs/decoder_lm.py).")
    return source.model, dict(source=f"--workdir={workdir}", step=source.step)


def build_hf_llama(max_len: int) -> tuple[nnx.Module, dict]:
    import torch
    import transformers
    from tx.interop import hf
    d = _HF_D_MODEL.value
    heads = max(4, d // 32)
    config = dict(vocab_size=_HF_VOCAB.value, hidden_size=d,
                  num_hidden_layers=_HF_LAYERS.value, num_attention_heads=heads,
                  num_key_value_heads=heads // 4 if heads >= 8 else 2,  # 8:2 at d=256
                  intermediate_size=(d * 8 // 3 + 15) // 16 * 16,
                  max_position_embeddings=max_len, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
                  pad_token_id=0)
    torch.manual_seed(_SEED.value)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():
        for key, p in ref.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in key else _HF_SPREAD * noise)
    with tempfile.TemporaryDirectory() as path:
        ref.save_pretrained(path)
        model = hf.load(path)
    info = dict(source="transformers LlamaForCausalLM, random init N(0, 0.05)",
                hidden_size=d, transformers=transformers.__version__,
                torch=torch.__version__)
    return model, info


def heldout_windows(n: int, length: int, seed: int) -> np.ndarray:
    """``[n, length]`` byte-token windows of the built-in text's eval documents."""
    stream = stdlib_corpus().split("eval").stream
    starts = np.random.default_rng(seed).integers(0, len(stream) - length + 1, n)
    return stream[starts[:, None] + np.arange(length)].astype(np.int32)


# ------------------------------------------------------------------------------ measurements

def _teacher_forced(graphdef, state, prompt, feed):
    """fp32 logits ``[B, N, V]``: the prefill's last position, then one decode step per token
    of ``feed [B, N - 1]`` (the true next tokens), in one ``lax.scan``."""
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    first = model(prompt)[:, -1]
    graphdef, state = nnx.split(model)

    def step(state, token_b):
        model = nnx.merge(graphdef, state, copy=True)
        logits = model(token_b[:, None])[:, -1]
        return nnx.state(model), logits

    _, rest = jax.lax.scan(step, state, feed.T)
    return jnp.concatenate([first[None], rest], axis=0).swapaxes(0, 1).astype(jnp.float32)


_teacher_forced_jit = jax.jit(_teacher_forced)


@jax.jit
def _forward(graphdef, state, tokens):
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    return model(tokens).astype(jnp.float32)


def cache_bytes(model) -> dict:
    """Bytes of the installed paged caches, all layers: per token slot of the pool, and the
    fixed per-sequence part (KIVI's fp32 partial page)."""
    per_slot = tail = 0.0
    for cache in generation_lib.caches(model):
        parts = [c[...] for store in (cache.k_pages, cache.v_pages) for c in store.values()]
        slots = parts[0].shape[1] * cache.page_size  # every part is [K, P, ...]
        per_slot += sum(x.nbytes for x in parts) / slots
        rows = cache.block_tables[...].shape[0]
        tail += sum(t[...].nbytes / rows for t in (cache.k_tail, cache.v_tail)
                    if t is not None)
    return dict(per_slot=per_slot, tail_per_seq=tail)


def planned_bytes(model, dtype: str, tokens: int) -> dict:
    """``tx.inference.kv_cache_bytes`` for one sequence on the paged cache: the marginal bytes
    of a token (one more page's worth, per token) and the effective bytes per token of a
    ``tokens``-long sequence (page rounding and KIVI's fp32 partial page included)."""
    size = _PAGE.value
    one = lambda t: kv_cache_bytes(model.config, 1, t, dtype=dtype, page_size=size)
    return dict(per_token=(one(2 * size) - one(size)) / size, effective=one(tokens) / tokens)


def measure(model, windows: np.ndarray, name: str, kv_dtype: str) -> tuple[dict, np.ndarray,
                                                                           np.ndarray]:
    """One storage on one model: its teacher-forced logits, free-running greedy tokens,
    bytes and decode speed."""
    p, n = _PROMPT_LEN.value, _NEW.value
    prompt, feed = jnp.asarray(windows[:, :p]), jnp.asarray(windows[:, p:p + n - 1])
    cache = Paged(_PAGE.value, kv=tx_flags.kv_storage(kv_dtype))
    cache.install(model, prompt, n)
    nbytes = cache_bytes(model)
    graphdef, state = nnx.split(model)
    model.drop_cache()
    start = time.perf_counter()
    logits = np.asarray(_teacher_forced_jit(graphdef, state, prompt, feed))
    tf_seconds = time.perf_counter() - start

    first = {}

    def run():
        out = generate(model, windows[:, :p], max_new_tokens=n, strategy=Greedy(),
                       cache=cache)
        first.setdefault("tokens", out.tokens)
        return out.tokens

    seconds = median_seconds(run, (), _REPEATS.value)
    row = dict(kv=name, kv_dtype=kv_dtype, page_size=_PAGE.value,
               bytes_per_token_measured=round(nbytes["per_slot"], 2),
               tail_bytes_per_seq=round(nbytes["tail_per_seq"], 1),
               teacher_forced_seconds_with_compile=round(tf_seconds, 2),
               decode_seconds=round(seconds, 4),
               tokens_per_s=round(windows.shape[0] * n / seconds, 1))
    return row, logits, first["tokens"]


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    return float(-jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1).mean())


def bench_model(label: str, model, info: dict, windows: np.ndarray) -> list[dict]:
    p, n = _PROMPT_LEN.value, _NEW.value
    targets = windows[:, p:p + n]
    tokens = p + n
    found = []
    pages = -(-tokens // _PAGE.value)
    for name, kv_dtype, planner_dtype in STORAGES:
        _log(f"{label}: {name}")
        row, logits, free = measure(model, windows, name, kv_dtype)
        planned = planned_bytes(model, planner_dtype, tokens)
        measured_effective = (row["bytes_per_token_measured"] * pages * _PAGE.value
                              + row["tail_bytes_per_seq"]) / tokens
        row.update(bytes_per_token=planned["per_token"],
                   effective_bytes_per_token=round(planned["effective"], 3),
                   planner_matches_measured=bool(
                       abs(planned["per_token"] - row["bytes_per_token_measured"]) < 1e-6
                       and abs(planned["effective"] - measured_effective) < 1e-3))
        found.append((row, logits, free))

    base_row, base_logits, base_free = found[0]
    # The teacher-forced loop itself against one cache-free forward over the whole window.
    graphdef, state = nnx.split(model)
    full = np.asarray(_forward(graphdef, state, jnp.asarray(windows[:, :p + n - 1])))[:, p - 1:]
    base_row["fp32_vs_forward_max_abs"] = float(np.abs(full - base_logits).max())
    base_argmax, base_ce = base_logits.argmax(-1), _cross_entropy(base_logits, targets)
    base_bytes = None
    rows = []
    for row, logits, free in found:
        err = np.abs(logits - base_logits)
        agree = free == base_free
        prefix = np.where(agree.all(1), n, (~agree).argmax(1))
        ce = _cross_entropy(logits, targets)
        base_bytes = base_bytes or row["bytes_per_token"]
        row.update(
            model=label, compression=round(base_bytes / row["bytes_per_token"], 3),
            max_abs_logit_err=float(err.max()), mean_abs_logit_err=float(err.mean()),
            tf_argmax_agreement=float((logits.argmax(-1) == base_argmax).mean()),
            free_agreement=float(agree.mean()), free_prefix_mean=float(prefix.mean()),
            eval_loss=round(ce, 5), eval_loss_delta=ce - base_ce)
        rows.append(row)
    cfg = model.config
    info = dict(info, layers=cfg.num_layers, heads=cfg.attention.num_heads,
                kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size,
                logit_std=round(float(base_logits.std()), 3),
                eval_loss_fp32=round(base_ce, 4))
    for row in rows:
        row["model_info"] = info
    return rows


# ----------------------------------------------------------------------------------- output

def _versions() -> dict:
    return dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax=jax.__version__, python=platform.python_version())


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<9} {'kv':<15} {'bytes/tok':>9} {'eff b/tok':>9} {'x fp32':>6} "
            f"{'max|dlogit|':>11} {'mean|dlogit|':>12} {'tf argmax':>9} {'free agree':>10} "
            f"{'prefix':>6} {'eval loss':>9} {'d loss':>9} {'tok/s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<9} {r['kv']:<15} {r['bytes_per_token']:>9.1f} "
              f"{r['effective_bytes_per_token']:>9.1f} {r['compression']:>6.2f} "
              f"{r['max_abs_logit_err']:>11.4g} {r['mean_abs_logit_err']:>12.4g} "
              f"{r['tf_argmax_agreement']:>9.4f} {r['free_agreement']:>10.4f} "
              f"{r['free_prefix_mean']:>6.1f} {r['eval_loss']:>9.4f} "
              f"{r['eval_loss_delta']:>+9.5f} {r['tokens_per_s']:>8.1f}")


def run() -> dict:
    p, n = _PROMPT_LEN.value, _NEW.value
    if p < 1 or n < 2 or _PROMPTS.value < 1:
        raise app.UsageError(f"--prompt_len={p} >= 1, --new_tokens={n} >= 2 and "
                             f"--prompts={_PROMPTS.value} >= 1 are needed.")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    windows = heldout_windows(_PROMPTS.value, p + n, _SEED.value)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if _WORKDIR.value:
            model, info = load_byte_lm(_WORKDIR.value)
        else:
            model, info = train_byte_lm(_TRAIN_STEPS.value, _TRAIN_BATCH.value,
                                        max(128, p + n), tmp)
        rows += bench_model("byte_lm", model, info, windows)
    if not _SKIP_HF.value:
        model, info = build_hf_llama(p + n)
        rows += bench_model("hf_llama", model, info, windows)
    return dict(bench="kv_quant", prompts=_PROMPTS.value, prompt_len=p, new_tokens=n,
                page_size=_PAGE.value, repeats=_REPEATS.value, rows=rows,
                wall_seconds=round(time.perf_counter() - start, 1),
                load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2),
                cpu_count=os.cpu_count(), **_versions())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    out = run()
    print(f"{out['prompts']} held-out windows, {out['prompt_len']}-token prefill + "
          f"{out['new_tokens']} decode steps, paged cache L={out['page_size']}; errors, "
          "agreement and loss delta against the fp32 cache (teacher-forced unless 'free')")
    print_table(out["rows"])
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
