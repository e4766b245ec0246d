"""``flash_attention(..., return_lse=True)``: the row log-sum-exp and its gradient (the
cotangent ring attention sends back for each block), against ``jax.nn.logsumexp`` of the
masked logits, in interpret mode."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from tx.kernels import masks, reference

flash = importlib.import_module("tx.kernels.flash_attention")
B, T, S, N, K, H = 2, 12, 20, 4, 2, 8  # not block multiples; GQA 2


def _reference(q, k, v, mask, kv_lengths):
    o = reference.attention(q, k, v, mask=mask, kv_lengths=kv_lengths)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, N // K, H), k) * H ** -0.5
    visible = mask.dense(T, S)[None] & (np.arange(S)[None, None, :] <
                                        np.asarray(kv_lengths)[:, None, None])
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    lse = jnp.moveaxis(jax.nn.logsumexp(logits, axis=-1).reshape(B, N, T), 1, 2)
    return o, jnp.where(jnp.isinf(lse), -1e30, lse)


def test_lse_and_its_gradient_match_logsumexp():
    mask = masks.Local(3)  # a window: row 1's queries see none of its keys
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = (jax.random.normal(s, (B, S, K, H)) for s in ks[1:3])
    w_o, w_l = jax.random.normal(ks[3], q.shape), jax.random.normal(ks[4], (B, T, N))
    # Row 1 keeps 2 keys: under the window no query (positions 8..19) sees one.
    lengths = jnp.array([S, 2], jnp.int32)

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            seen = lse > -1e29  # an empty row's lse is a constant, not a function of q, k
            return jnp.sum(o * w_o) + jnp.sum(jnp.where(seen, lse, 0.0) * w_l)
        return f

    ours = lambda q, k, v: flash.flash_attention(q, k, v, mask=mask, kv_lengths=lengths,
                                                 return_lse=True)
    ref = lambda q, k, v: _reference(q, k, v, mask, lengths)
    (o, lse), (o_r, lse_r) = ours(q, k, v), ref(q, k, v)
    np.testing.assert_allclose(o, o_r, atol=2e-5)
    np.testing.assert_allclose(lse, lse_r, rtol=1e-5, atol=1e-5)
    # Rows that see nothing have the finite stand-in, and only they.
    np.testing.assert_array_equal(lse == -1e30, lse_r == -1e30)
    assert bool((lse[1] == -1e30).all()) and bool((lse[0] > -1e29).all())
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5)
