"""The attention layer: heads axis, registry fallback, KV caches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx.kernels import masks
from tx.attention import Attention, KVCache, RollingKVCache, attend, register
from tx.attention import registry

B, T, S, D, N, H = 2, 7, 11, 24, 6, 4


def _layer(num_kv_heads, mask=None, seed=0, **kw):
    return Attention(D, N, num_kv_heads, H, mask=mask, rngs=nnx.Rngs(seed), **kw)


def _x(length, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, length, D))


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
def test_gqa_equals_mha_with_repeated_kv_weights(kv_heads):
    """GQA is MHA whose K/V heads are shared within groups: same weights, same output."""
    gqa = _layer(kv_heads, masks.Causal())
    mha = _layer(N, masks.Causal())
    group = N // kv_heads
    mha.q_dnh[...], mha.o_nhd[...] = gqa.q_dnh[...], gqa.o_nhd[...]
    mha.k_dkh[...] = jnp.repeat(gqa.k_dkh[...], group, axis=1)
    mha.v_dkh[...] = jnp.repeat(gqa.v_dkh[...], group, axis=1)
    x = _x(T)
    np.testing.assert_allclose(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_gqa_with_all_kv_heads_is_plain_mha():
    layer = _layer(N)
    x = _x(T)
    q = jnp.einsum("BTD,DNH->BTNH", x, layer.q_dnh[...])
    k = jnp.einsum("BTD,DNH->BTNH", x, layer.k_dkh[...])
    v = jnp.einsum("BTD,DNH->BTNH", x, layer.v_dkh[...])
    probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) * H ** -0.5, axis=-1)
    want = jnp.einsum("BNTS,BSNH,NHD->BTD", probs, v, layer.o_nhd[...])
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=1e-5)


def _shapes_in_jaxpr(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(var.aval.shape)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                yield from _shapes_in_jaxpr(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_and_mqa_never_repeat_kv(kv_heads):
    """No intermediate holds K/V expanded to every query head ([B, S, N, H] or its
    flattenings), in the forward pass or the gradient."""
    layer = _layer(kv_heads, masks.Causal())
    graphdef, params = nnx.split(layer)

    def loss(p, x, ctx):
        return nnx.merge(graphdef, p)(x, context_bsd=ctx).sum()

    x, ctx = _x(T), _x(S, seed=2)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params, x, ctx).jaxpr
    shapes = set(_shapes_in_jaxpr(jaxpr))
    repeated = {(B, S, N, H), (B, S, kv_heads, N // kv_heads, H), (B, S, N * H),
                (B, N, S, H)}
    assert not shapes & repeated, shapes & repeated
    assert (B, S, kv_heads, H) in shapes  # the K/V really are there, un-repeated


def test_registry_falls_back_in_order():
    calls = []

    def picky(q, k, v, **kw):
        calls.append("picky")
        raise NotImplementedError("only on Tuesdays")

    register("picky", picky)
    q = jnp.ones((1, 3, 2, 4))
    out = attend(q, q, q, mask=masks.Causal(), implementation=("picky", "xla"))
    assert calls == ["picky"] and out.shape == q.shape
    with pytest.raises(NotImplementedError, match="only on Tuesdays"):
        attend(q, q, q, implementation=("picky",))
    with pytest.raises(ValueError, match="implementation='nope'"):
        attend(q, q, q, implementation=("nope", "xla"))


def test_cudnn_declines_on_cpu_and_falls_back():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU cuDNN serves the case; this checks the CPU fallback")
    q = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="cudnn"):
        attend(q, q, q, implementation=("cudnn",))
    assert attend(q, q, q, implementation=("cudnn", "xla")).dtype == jnp.bfloat16
    assert "xla" in registry.names()


def test_rolling_cache_is_bounded_and_matches_full():
    window = 4
    layer = _layer(2, masks.Local(window - 1))
    x = _x(13)
    full = layer(x)
    layer.init_cache(B, 13)
    assert isinstance(layer.cache, RollingKVCache) and layer.cache.k["x"][...].shape[1] == window
    chunks = [layer(x[:, :6]), layer(x[:, 6:7]), layer(x[:, 7:13])]  # a chunk longer than W
    np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_full_cache_for_global_patterns():
    layer = _layer(3, masks.Causal())
    layer.init_cache(B, 9)
    assert isinstance(layer.cache, KVCache) and layer.cache.k["x"][...].shape == (B, 9, 3, H)
