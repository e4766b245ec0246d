"""Attention whose values differ from the keys (issue 35, MLA): values of their own head dim
(``v [B, S, K, Hv]``, the expanded form) and values read from the keys' first columns
(``value_dim``, the latent cache). The reference against a numpy softmax written here, the
caches against the dense reference at their positions, and which backends serve or decline.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from tx.attention import calls, registry
from tx.kernels import masks as M
from tx.kernels import reference


def _numpy_attention(q, k, v, visible, scale):
    """Plain numpy: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv], visible [B,T,S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = np.where(visible[:, None], logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(logits - m)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("h,hv", [(24, 16), (8, 20)])
def test_reference_dense_value_head_dim(h, hv):
    b, t, n, kh = 2, 7, 4, 2
    q, k, v = _rand((b, t, n, h), 0), _rand((b, t, kh, h), 1), _rand((b, t, kh, hv), 2)
    lengths = jnp.array([7, 4], jnp.int32)
    out = reference.attention(q, k, v, mask=M.Causal(), kv_lengths=lengths)
    assert out.shape == (b, t, n, hv)
    causal = np.tril(np.ones((t, t), bool))[None] & (np.arange(t)[None, None] <
                                                    np.asarray(lengths)[:, None, None])
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal, h ** -0.5),
                               atol=1e-5, rtol=1e-5)
    # Query blocks (a longer call's path) give the same values and shape.
    blocked = reference.attention(q, k, v, mask=M.Causal(), kv_lengths=lengths, block_q=2)
    np.testing.assert_allclose(blocked, out, atol=1e-6)


def test_reference_dense_refuses_mismatched_kv():
    q, k = _rand((1, 3, 2, 8), 0), _rand((1, 3, 2, 8), 1)
    with pytest.raises(ValueError, match=r"must agree in \[B, S, K\]"):
        reference.attention(q, k, _rand((1, 4, 2, 6), 2))


def _latent_pool(b=2, n=4, kh=1, h=24, page=4, pages=7, seed=0):
    """A shuffled pool ``[K, P, L, H]`` and tables; row lengths 9 and 5 (t=2 new tokens)."""
    rng = np.random.default_rng(seed)
    k_pages = _rand((kh, pages, page, h), seed + 1)
    tables = jnp.asarray(rng.permutation(pages)[:b * 3].reshape(b, 3), jnp.int32)
    q = _rand((b, 2, n, h), seed + 2)
    return q, k_pages, tables, jnp.array([9, 5], jnp.int32)


def _gathered(k_pages, tables):
    """``[B, S, K, H]`` keys of each row's pages, in order."""
    kh, _, page, h = k_pages.shape
    b, m = tables.shape
    return jnp.moveaxis(k_pages[:, tables].reshape(kh, b, m * page, h), 0, 2)


def _expected(q, keys, lengths, r, mask):
    """Dense numpy attention at the cache's positions with values = keys[..., :r]."""
    b, t = q.shape[:2]
    s = keys.shape[1]
    q_pos = np.asarray(lengths)[:, None] - t + np.arange(t)[None]
    kv = np.arange(s)[None, None]
    visible = np.asarray(mask.predicate(q_pos[:, :, None], kv, s)) & \
        (kv < np.asarray(lengths)[:, None, None])
    return _numpy_attention(q, keys, keys[..., :r], visible, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("kh", [1, 2])
def test_reference_paged_value_dim(kh):
    r = 16
    q, k_pages, tables, lengths = _latent_pool(kh=kh)
    out = reference.paged_attention(q, k_pages, None, tables, lengths, mask=M.Causal(),
                                    value_dim=r)
    assert out.shape == q.shape[:3] + (r,)
    want = _expected(q, _gathered(k_pages, tables), lengths, r, M.Causal())
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_reference_paged_value_dim_int8():
    r = 16
    q, k_pages, tables, lengths = _latent_pool()
    x = np.asarray(k_pages)
    scales = np.abs(x).max(-1) / 127
    codes = jnp.asarray(np.round(x / scales[..., None]), jnp.int8)
    out = reference.paged_attention(q, codes, None, tables, lengths, mask=M.Causal(),
                                    k_scales=jnp.asarray(scales), value_dim=r)
    keys = _gathered(codes, tables).astype(jnp.float32) * \
        _gathered(jnp.asarray(scales)[..., None], tables)
    np.testing.assert_allclose(out, _expected(q, keys, lengths, r, M.Causal()), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("value_dim,v,match", [
    (30, None, r"value_dim=30 must be an int in \[1, 24\]"),
    (8, "pages", r"pass v=None"),
    (None, None, r"v is None"),
])
def test_value_dim_refused(value_dim, v, match):
    q, k_pages, tables, lengths = _latent_pool()
    with pytest.raises(ValueError, match=match):
        reference.paged_attention(q, k_pages, k_pages if v else None, tables, lengths,
                                  value_dim=value_dim)


def test_backends_serve_or_decline_value_dim():
    """Latent calls: each built-in backend serves them (pallas through its paged kernel, cpu
    reading the pages in place); cpu declines int8 latent pages with its reason, and an order
    with xla after it falls through to xla."""
    r = 16
    q, k_pages, tables, lengths = _latent_pool()
    want = _expected(q, _gathered(k_pages, tables), lengths, r, M.Causal())
    paged = calls.Paged(q, k_pages, None, tables, lengths, mask=M.Causal(), value_dim=r)
    # A contiguous cache [B, S, K, H] with the same keys and lengths.
    cached = calls.Cached(q, _gathered(k_pages, tables), None, lengths, mask=M.Causal(),
                          value_dim=r)
    for path, call in (("paged", paged), ("cached", cached)):
        for backend in ("xla", "cpu", "pallas"):
            with registry.recording() as records:
                out = registry.serve(path, call, (backend,))
            assert records == [(path, backend, path)]
            np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5, err_msg=backend)
    ones = jnp.ones(k_pages.shape[:3], jnp.float32)
    int8 = calls.Paged(q, k_pages.astype(jnp.int8), None, tables, lengths, mask=M.Causal(),
                       value_dim=r, k_scales=ones)
    with pytest.raises(registry.Unserved, match=r"cpu paged: .*k_scales"):
        registry.serve("paged", int8, ("cpu",))
    with registry.recording() as records:
        registry.serve("paged", int8, ("cpu", "xla"))
    assert records == [("paged", "xla", "paged")]


def test_backends_dense_value_head_dim():
    """Dense values of their own head dim: xla serves; cudnn declines off a GPU either way."""
    q, k, v = _rand((1, 5, 2, 24), 0), _rand((1, 5, 2, 24), 1), _rand((1, 5, 2, 16), 2)
    call = calls.Dense(q, k, v, mask=M.Causal())
    with registry.recording() as records:
        out = registry.serve("dense", call, ("cudnn", "xla"))
    assert records == [("dense", "xla", "dense")] and out.shape == (1, 5, 2, 16)
    np.testing.assert_allclose(out, reference.attention(q, k, v, mask=M.Causal()), atol=0)
    jax.grad(lambda v: registry.serve("dense", calls.Dense(q, k, v), "xla").sum())(v)
