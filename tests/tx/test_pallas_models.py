"""With implementation=('pallas',) every model family trains and matches the xla path.

No fallback is allowed here ('pallas' alone), so a case the kernel silently declined would
fail instead of passing on the reference. On CPU the kernel runs in interpret mode.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tx import models
from tx.flags import model_config
from tx.train import init_state, make_train_step

B, T, V = 2, 20, 40


def _batch(seq2seq):
    rng = np.random.default_rng(0)
    toks = lambda: jnp.asarray(rng.integers(8, V, (B, T)), jnp.int32)  # noqa: E731
    batch = {"inputs": toks(), "targets": toks(), "weights": jnp.ones((B, T), jnp.float32),
             "lengths": jnp.array([T, T - 7], jnp.int32)}
    if seq2seq:
        batch.update(source=toks(), source_lengths=jnp.array([T, 9], jnp.int32))
    return batch


def _losses(cfg, steps=3):
    optimizer = optax.adam(1e-2)
    state = init_state(models.build(cfg), optimizer)
    step = make_train_step(state.graphdef, optimizer)
    params, rest, opt_state = state.params, state.rest, state.opt_state
    batch, out = _batch("source" in cfg.head.batch_keys), []
    for _ in range(steps):
        params, rest, opt_state, metrics = step(params, rest, opt_state, batch)
        out.append(float(metrics["loss_sum"] / metrics["count"]))
    return out


@pytest.mark.parametrize("task, attention", [
    ("lm", "gqa+local"),
    ("lm", "mqa+sparse"),
    ("mlm", "gqa+bigbird"),
    ("seq2seq", "gqa"),
])
def test_pallas_trains_like_xla(task, attention):
    base = dict(task=task, vocab_size=V, d_model=32, num_heads=4, num_layers=1,
                d_ff=64, window=6, stride=4, sparse_block=4, attention=attention,
                positions="rope")
    pallas = _losses(model_config(**base, implementation=("pallas",)))
    xla = _losses(model_config(**base, implementation=("xla",)))
    assert pallas[-1] < pallas[0]  # it trains
    np.testing.assert_allclose(pallas, xla, rtol=2e-4, atol=2e-4)
