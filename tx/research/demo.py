"""A short demo: train the default tiny decoder on the built-in byte corpus and print loss."""

from __future__ import annotations

import time

import jax
import optax

from tx import data, models
from tx.flags import ModelFlags, parse
from tx.train.step import init_state, make_eval_step, make_train_step


def run(*, steps: int = 60, batch_size: int = 16, seq_len: int = 128, seed: int = 0,
        attention: str = "gqa", log_every: int = 10, print_fn=print) -> dict:
    """Trains ``steps`` steps; returns the first and last train loss and the eval loss."""
    train_ds = data.make_dataset("bytes", batch_size=batch_size, seq_len=seq_len, seed=seed)
    eval_ds = data.make_dataset("bytes", batch_size=batch_size, seq_len=seq_len, seed=seed,
                                split="eval")
    cfg = ModelFlags(vocab_size=train_ds.vocab_size, d_model=128, num_heads=4, num_layers=2,
                      d_ff=512, attention=attention, max_len=seq_len)
    # A short run warms up for a tenth of it (at most 10 steps).
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(10, steps // 10), steps)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    state = init_state(models.build(parse(cfg), seed=seed), optimizer)
    train_step, eval_step = make_train_step(state.graphdef, optimizer), make_eval_step(state.graphdef)
    params, rest, opt_state = state.params, state.rest, state.opt_state
    print_fn(f"tx demo: decoder {cfg.attention} (N={cfg.num_heads}, K={cfg.kv_heads}), "
             f"{steps} steps of {batch_size}x{seq_len} bytes on {jax.default_backend()}")
    losses, start = [], time.perf_counter()
    for step in range(steps):
        params, rest, opt_state, metrics = train_step(params, rest, opt_state,
                                                      train_ds.batch(step))
        losses.append(float(metrics["loss"]))
        if step % log_every == 0 or step == steps - 1:
            print_fn(f"step {step:4d}  train loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    evals = [eval_step(params, rest, eval_ds.batch(i)) for i in range(4)]
    eval_loss = float(sum(m["loss_sum"] for m in evals) / sum(m["count"] for m in evals))
    tokens_per_s = steps * batch_size * seq_len / elapsed
    print_fn(f"eval loss {eval_loss:.4f}  ({tokens_per_s:,.0f} train tokens/s incl. compile)")
    return {"first_loss": losses[0], "last_loss": losses[-1], "eval_loss": eval_loss}
