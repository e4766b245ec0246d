"""FAVOR+'s causal linear attention as the gated recurrence with no decay (issue 36, item 1):
``kernels.gated_chunked(log_decay=None)`` against the step-by-step recurrence with log decay 0
(outputs and gradients, packing, key lengths, GQA, a chunk not dividing T), and
``kernels.linear_chunked`` resuming from its ``(S, z)`` state as decoding does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels.gated_chunked import gated_chunked
from tx.kernels.gated_linear import gated_linear_attention
from tx.kernels.gated_reference import gated_recurrence
from tx.kernels.linear_chunked import linear_attention_chunked

B, T, N, K, F, H = 2, 11, 4, 2, 8, 5
SEG = jnp.asarray([[0] * 4 + [1] * 7, [0] * 11], jnp.int32)
LENS = jnp.asarray([11, 7], jnp.int32)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    # Positive features, as FAVOR+ gives them (so every denominator is > 0).
    q = jnp.asarray(np.exp(0.3 * rng.standard_normal((B, T, N, F))), jnp.float32)
    k = jnp.asarray(np.exp(0.3 * rng.standard_normal((B, T, K, F))), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    do = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    return q, k, v, do


def _value_and_grads(fn, q, k, v, do):
    # Under jit: op by op, the scans would compile primitive by primitive (slow on CPU).
    return jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * do).sum(),
                                      argnums=(0, 1, 2)))(q, k, v)


def test_no_decay_is_the_recurrence_with_log_decay_zero(qkv):
    q, k, v, do = qkv
    zero = jnp.zeros((B, T, K), jnp.float32)
    kw = dict(segment_ids=SEG, kv_lengths=LENS)
    # The loss sum(o * do) and its q/k/v gradients (dv = sum_t A_ts do_t pins the output).
    want_loss, want = _value_and_grads(
        lambda q, k, v: gated_recurrence(q, k, v, zero, **kw), q, k, v, do)
    got_loss, got = _value_and_grads(
        lambda q, k, v: gated_chunked(q, k, v, None, chunk=4, **kw), q, k, v, do)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_linear_chunked_resumes_from_its_state(qkv):
    """The first 6 tokens, then the last 5 from their ``(S, z)``, equal all 11 at once (what
    a FAVOR+ layer's decoding cache does); the final state is the sum over every key."""
    q, k, v, _ = qkv
    run = jax.jit(linear_attention_chunked, static_argnames=("chunk", "final_state"))
    whole, (s_all, z_all) = run(q, k, v, chunk=4, final_state=True)
    head, state = run(q[:, :6], k[:, :6], v[:, :6], chunk=4, final_state=True)
    tail, (s_end, z_end) = run(q[:, 6:], k[:, 6:], v[:, 6:], chunk=3, initial_state=state,
                               final_state=True)
    np.testing.assert_allclose(jnp.concatenate([head, tail], axis=1), whole, atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_allclose(s_end, s_all, rtol=1e-5)
    np.testing.assert_allclose(z_all, k.sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(z_end, z_all, rtol=1e-5)


def test_bad_state_and_missing_decay_are_refused_by_name(qkv):
    q, k, v, _ = qkv
    bad = (jnp.zeros((B, K, F, H + 1)), jnp.zeros((B, K, F)))
    with pytest.raises(ValueError, match=r"initial_state shapes \(2, 2, 8, 6\)"):
        linear_attention_chunked(q, k, v, chunk=4, initial_state=bad)
    # Only the jnp chunked form has the no-decay case; the kernel asks for a log decay.
    with pytest.raises(ValueError, match="log_decay.shape=None"):
        gated_linear_attention(q, k, v, None)
