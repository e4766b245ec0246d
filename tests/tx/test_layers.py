"""Tests for tx.layers: shapes, dtypes, position math against plain formulas, annotations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx import layers

B, T, S, N, H, D, F, V = 2, 5, 7, 4, 8, 16, 32, 11
DTYPES = [jnp.float32, jnp.bfloat16]


def _positions(shape, seed=0, high=50):
    # Arbitrary, non-arange positions (packed documents, decode offsets).
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _params(module):
    return [v for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)]


# ----------------------------------------------------------------------------- embed


@pytest.mark.parametrize('dtype', DTYPES)
def test_embed_shapes_and_dtypes(dtype):
    embed = layers.Embed(V, D, dtype=dtype, rngs=nnx.Rngs(0))
    ids_bt = _positions((B, T), high=V)
    x_btd = embed(ids_bt)
    assert x_btd.shape == (B, T, D) and x_btd.dtype == dtype
    logits_btv = embed.attend(x_btd)
    assert logits_btv.shape == (B, T, V) and logits_btv.dtype == jnp.float32
    table = np.asarray(embed.table_vd[...], np.float32)
    np.testing.assert_allclose(np.asarray(x_btd, np.float32), table[np.asarray(ids_bt)],
                               rtol=1e-2 if dtype == jnp.bfloat16 else 0)


def test_embed_init_scale():
    table = np.asarray(layers.Embed(1000, 256, rngs=nnx.Rngs(0)).table_vd[...])
    np.testing.assert_allclose(table.std(), 256 ** -0.5, rtol=0.05)


# ----------------------------------------------------------------------------- positions


def test_sinusoidal_matches_numpy_formula():
    pos_bt = _positions((B, T), high=1000)
    got = np.asarray(layers.sinusoidal(pos_bt, D))
    p = np.asarray(pos_bt, np.float64)[..., None]
    i = np.arange(D)
    angle = p / 10000.0 ** ((i - i % 2) / D)
    want = np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
    assert got.shape == (B, T, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-4)  # fp32 angles up to ~1000 rad
    np.testing.assert_array_equal(np.asarray(layers.SinusoidalPositions(D)(pos_bt)), got)


def test_sinusoidal_rejects_odd_d_model():
    with pytest.raises(ValueError, match='d_model'):
        layers.sinusoidal(_positions((B, T)), 7)


@pytest.mark.parametrize('dtype', DTYPES)
def test_learned_positions_shape_and_clamp(dtype):
    learned = layers.LearnedPositions(16, D, dtype=dtype, rngs=nnx.Rngs(0))
    out = learned(jnp.asarray([[0, 3, 15, 99]], jnp.int32))
    assert out.shape == (1, 4, D) and out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out[0, 3]), np.asarray(out[0, 2]))  # clamped


@pytest.mark.parametrize('dtype', DTYPES)
def test_rope_shape_dtype_and_norm(dtype):
    x = jax.random.normal(jax.random.key(0), (B, T, N, H), jnp.float32)
    out = layers.Rotary(H)(x.astype(dtype), _positions((B, T)))
    assert out.shape == (B, T, N, H) and out.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out, np.float32), axis=-1),
                               np.linalg.norm(np.asarray(x.astype(dtype), np.float32), axis=-1),
                               rtol=tol)


def test_rope_position_zero_is_identity():
    x = jax.random.normal(jax.random.key(0), (B, T, N, H))
    out = layers.Rotary(H)(x, jnp.zeros((B, T), jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-6)


def test_rope_scores_depend_only_on_position_difference():
    rope = layers.Rotary(H)
    q = jax.random.normal(jax.random.key(1), (B, T, N, H))
    k = jax.random.normal(jax.random.key(2), (B, S, N, H))
    q_pos, k_pos = _positions((B, T), 1), _positions((B, S), 2)
    shift = jnp.full((B, 1), 37, jnp.int32)  # explicit rank: broadcasting [B,1] over [B,T]

    def scores(qp, kp):
        return jnp.einsum('BTNH,BSNH->BNTS', rope(q, qp), rope(k, kp))

    np.testing.assert_allclose(np.asarray(scores(q_pos, k_pos)),
                               np.asarray(scores(q_pos + shift, k_pos + shift)),
                               rtol=1e-4, atol=1e-4)
    # Sanity: the scores do depend on positions at all.
    assert not np.allclose(np.asarray(scores(q_pos, k_pos)),
                           np.asarray(scores(q_pos + shift, k_pos)), atol=1e-2)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match='head_dim'):
        layers.Rotary(7)


def _t5_bucket_reference(rel, num_buckets, max_distance, bidirectional):
    """Brute-force scalar version of T5's relative-position bucketing."""
    bucket, n = 0, -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 64), (8, 20)])
def test_t5_bucket_matches_reference(bidirectional, num_buckets, max_distance):
    rel = np.arange(-1000, 1001)
    got = np.asarray(layers.t5_bucket(jnp.asarray(rel, jnp.int32), num_buckets=num_buckets,
                                      max_distance=max_distance, bidirectional=bidirectional))
    want = [_t5_bucket_reference(int(r), num_buckets, max_distance, bidirectional) for r in rel]
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == num_buckets - 1


def test_t5_bucket_direction():
    rel = jnp.asarray([-3, 3], jnp.int32)
    kw = dict(num_buckets=32, max_distance=128)
    bi = np.asarray(layers.t5_bucket(rel, bidirectional=True, **kw))
    uni = np.asarray(layers.t5_bucket(rel, bidirectional=False, **kw))
    assert bi[0] != bi[1] and bi[1] >= 16  # future keys use the upper half
    assert uni[1] == 0 and uni[0] == 3  # causal: future keys collapse to bucket 0


def test_t5_relative_bias_values():
    bias_mod = layers.T5RelativeBias(N, bidirectional=True, rngs=nnx.Rngs(0))
    q_pos, kv_pos = _positions((B, T), 3), _positions((B, S), 4)
    bias = np.asarray(bias_mod(q_pos, kv_pos))
    assert bias.shape == (B, N, T, S) and bias.dtype == np.float32
    table = np.asarray(bias_mod.table[...])
    b, t, s = 1, 2, 3
    rel = int(kv_pos[b, s] - q_pos[b, t])
    np.testing.assert_allclose(bias[b, :, t, s], table[_t5_bucket_reference(rel, 32, 128, True)])


def test_alibi_slopes():
    np.testing.assert_allclose(layers.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
    # 6 heads: slopes for 4 heads, then every other slope for 8 heads.
    np.testing.assert_allclose(layers.alibi_slopes(6),
                               [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])


def test_alibi_bias():
    q_pos, kv_pos = _positions((B, T), 5), _positions((B, S), 6)
    bias = np.asarray(layers.ALiBiBias(N)(q_pos, kv_pos))
    assert bias.shape == (B, N, T, S) and bias.dtype == np.float32
    dist = np.abs(np.asarray(q_pos)[:, None, :, None] - np.asarray(kv_pos)[:, None, None, :])
    slopes = np.asarray(layers.alibi_slopes(N))[None, :, None, None]
    np.testing.assert_allclose(bias, -slopes * dist, rtol=1e-6)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize('kind', layers.NORMS)
@pytest.mark.parametrize('out_dtype', DTYPES)
def test_norm_computes_in_fp32(kind, out_dtype):
    # Large mean: in bf16, E[x^2] - E[x]^2 would cancel catastrophically.
    x = (100.0 + jax.random.normal(jax.random.key(0), (B, T, D))).astype(jnp.bfloat16)
    norm = layers.make_norm(kind, D, dtype=out_dtype, rngs=nnx.Rngs(0))
    out = norm(x)
    assert out.shape == (B, T, D) and out.dtype == out_dtype
    x32 = np.asarray(x, np.float32)
    if kind == 'layernorm':
        x32 = x32 - x32.mean(-1, keepdims=True)
    want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6)
    tol = 1e-5 if out_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=tol, atol=tol)


def test_bad_norm_kind():
    with pytest.raises(ValueError, match=r"norm.*'batchnorm'.*layernorm"):
        layers.make_norm('batchnorm', D, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- mlp


@pytest.mark.parametrize('activation', layers.ACTIVATIONS)
@pytest.mark.parametrize('dtype', DTYPES)
def test_mlp_forward_and_grads(activation, dtype):
    mlp = layers.MLP(D, F, activation=activation, use_bias=True, dtype=dtype, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, T, D)).astype(dtype)
    out = mlp(x)
    assert out.shape == (B, T, D) and out.dtype == dtype
    grads = nnx.grad(lambda m: jnp.mean(m(x).astype(jnp.float32) ** 2))(mlp)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == (6 if activation in ('swiglu', 'geglu') else 4)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_mlp_dropout_train_vs_eval():
    mlp = layers.MLP(D, F, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    mlp.eval()
    reference = mlp(x)
    np.testing.assert_array_equal(np.asarray(mlp(x)), np.asarray(reference))
    mlp.train()
    assert not np.allclose(np.asarray(mlp(x)), np.asarray(reference))
    mlp.eval()
    np.testing.assert_array_equal(np.asarray(mlp(x)), np.asarray(reference))


def test_bad_activation():
    with pytest.raises(ValueError, match=r"activation.*'tanh'"):
        layers.MLP(D, F, activation='tanh', rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- annotations


def _all_modules():
    rngs = nnx.Rngs(0)
    return {
        'embed': layers.Embed(V, D, rngs=rngs),
        'learned': layers.LearnedPositions(16, D, rngs=rngs),
        't5': layers.T5RelativeBias(N, rngs=rngs),
        'layernorm': layers.make_norm('layernorm', D, rngs=rngs),
        'rmsnorm': layers.make_norm('rmsnorm', D, rngs=rngs),
        **{f'mlp_{a}': layers.MLP(D, F, activation=a, use_bias=True, rngs=rngs)
           for a in layers.ACTIVATIONS},
    }


@pytest.mark.parametrize('name,module', list(_all_modules().items()))
def test_every_param_has_logical_axes(name, module):
    params = _params(module)
    assert params, name
    for param in params:
        names = param.get_metadata().get('out_sharding')
        assert names is not None and len(names) == param[...].ndim, (name, names)
        assert any(n is not None for n in names), (name, names)
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(module, nnx.Param)),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(params)
    assert all(len(spec) == p[...].ndim for spec, p in zip(specs, params))


def test_expected_axis_names():
    mods = _all_modules()

    def names(module):
        return sorted(tuple(p.get_metadata()['out_sharding']) for p in _params(module))

    assert names(mods['embed']) == [('vocab', 'embed')]
    assert names(mods['learned']) == [(None, 'embed')]
    assert names(mods['t5']) == [('relpos_buckets', 'heads')]
    assert names(mods['layernorm']) == [('embed',), ('embed',)]
    assert names(mods['mlp_swiglu']) == sorted(
        [('embed', 'mlp')] * 2 + [('mlp',)] * 2 + [('mlp', 'embed'), ('embed',)])


def test_params_shard_on_a_mesh():
    # The logical names map onto a real mesh through axis rules without editing modules.
    mlp = layers.MLP(D, F, activation='swiglu', rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((1,), ('model',))
    rules = (('mlp', 'model'), ('embed', None))
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(mlp, nnx.Param))
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    sharded = jax.device_put(nnx.state(mlp, nnx.Param), shardings)
    assert sharded['wo']['kernel'][...].sharding.spec == jax.sharding.PartitionSpec('model', None)
