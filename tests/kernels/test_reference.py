"""The jnp reference attention against a naive loop, plus its documented edge cases and the
argument checks it runs. Rows that see no key (zeros, zero gradients) are checked for every
implementation, this one included (``TestXla``), by ``tests/attention_suite.py``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import checks, reference
from tx.kernels.masks import BigBird, Causal, Full, GlobalTokens, Local, Strided

# One compiled call per shape is much cheaper than op-by-op dispatch on a small CPU box.
attention = jax.jit(reference.attention, static_argnames=("mask", "scale"))
attention_weights = jax.jit(reference.attention_weights, static_argnames=("mask", "scale"))

# --- naive implementation --------------------------------------------------------------------

# Scalar position predicates, written from the documented mask semantics.
PAIR = {
    "full": lambda qp, kp: True,
    "causal": lambda qp, kp: kp <= qp,
    "local2": lambda qp, kp: qp - 2 <= kp <= qp,
    "local1_2": lambda qp, kp: qp - 1 <= kp <= qp + 2,
    "strided3": lambda qp, kp: qp >= kp and ((qp - kp) < 3 or (qp - kp) % 3 == 0),
    "global0": lambda qp, kp: qp == 0 or kp == 0,
}
MASKS = {"full": Full(), "causal": Causal(), "local2": Local(2), "local1_2": Local(1, 2),
         "strided3": Strided(3), "global0": GlobalTokens((0,))}


def naive_visible(pair, b, t, s, segment_ids=None, kv_lengths=None, q_positions=None,
                  kv_positions=None):
    vis = np.zeros((b, t, s), dtype=bool)
    for bi in range(b):
        for ti in range(t):
            qp = int(q_positions[bi, ti]) if q_positions is not None else ti + s - t
            for si in range(s):
                kp = int(kv_positions[bi, si]) if kv_positions is not None else si
                ok = kp >= 0 and pair(qp, kp)
                if segment_ids is not None:
                    ok = ok and segment_ids[0][bi, ti] == segment_ids[1][bi, si]
                if kv_lengths is not None:
                    ok = ok and si < kv_lengths[bi]
                vis[bi, ti, si] = ok
    return vis


def naive_attention(q, k, v, visible, bias=None, scale=None):
    """One (batch, head, query) at a time, in float64; head n reads kv head n // G."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ni in range(n):
            kv_head = ni // g
            for ti in range(t):
                keys = [si for si in range(s) if visible[bi, ti, si]]
                if not keys:
                    continue  # a query that sees nothing returns zeros
                logits = []
                for si in keys:
                    x = float(np.dot(q[bi, ti, ni], k[bi, si, kv_head])) * scale
                    if bias is not None:
                        x += float(bias[bi % bias.shape[0], ni % bias.shape[1], ti, si])
                    logits.append(x)
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                z = sum(w)
                for wi, si in zip(w, keys):
                    out[bi, ti, ni] += (wi / z) * v[bi, si, kv_head]
    return out


def make_qkv(b, t, s, n, kh, h, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(dtype)
    k = rng.standard_normal((b, s, kh, h)).astype(dtype)
    v = rng.standard_normal((b, s, kh, h)).astype(dtype)
    return q, k, v


# (T, S, N, K): MHA, GQA 2 and 4, MQA, T != S both ways.
HEADS_SHAPES = [(5, 5, 4, 4), (5, 5, 4, 2), (6, 6, 8, 2), (4, 7, 4, 1), (7, 4, 6, 3),
                (1, 9, 4, 2)]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("t,s,n,kh", HEADS_SHAPES)
def test_attention_matches_naive(mask_name, t, s, n, kh):
    b, h = 2, 8
    q, k, v = make_qkv(b, t, s, n, kh, h, seed=t * 100 + s * 10 + kh)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              mask=MASKS[mask_name])
    vis = naive_visible(PAIR[mask_name], b, t, s)
    expected = naive_attention(q, k, v, vis)
    assert out.shape == (b, t, n, h) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


def test_default_mask_is_full():
    q, k, v = make_qkv(2, 3, 5, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(attention(q, k, v)),
                                  np.asarray(attention(q, k, v, mask=Full())))


def test_bigbird_mask_matches_naive_via_dense():
    b, t, s, n, kh, h = 1, 16, 16, 2, 1, 4
    mask = BigBird(4, random_blocks=1, seed=5)
    q, k, v = make_qkv(b, t, s, n, kh, h)
    vis = np.broadcast_to(mask.dense(t, s), (b, t, s))
    out = attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, vis), atol=2e-5)


def _segments(b, length, rng, num):
    return np.sort(rng.integers(0, num, size=(b, length)), axis=1).astype(np.int32)


@pytest.mark.parametrize("mask_name", ["full", "causal", "local1_2"])
@pytest.mark.parametrize("t,s,n,kh", [(6, 6, 4, 2), (4, 8, 4, 4), (8, 5, 2, 1)])
def test_segment_ids_and_kv_lengths(mask_name, t, s, n, kh):
    b, h = 3, 4
    rng = np.random.default_rng(1)
    q, k, v = make_qkv(b, t, s, n, kh, h, seed=2)
    seg = (_segments(b, t, rng, 3), _segments(b, s, rng, 3))
    lengths = np.array([s, s - 2, 0], dtype=np.int32)
    for kwargs in ({"segment_ids": seg}, {"kv_lengths": lengths},
                   {"segment_ids": seg, "kv_lengths": lengths}):
        out = attention(q, k, v, mask=MASKS[mask_name],
                                  **{key: (tuple(jnp.asarray(x) for x in val)
                                           if key == "segment_ids" else jnp.asarray(val))
                                     for key, val in kwargs.items()})
        vis = naive_visible(PAIR[mask_name], b, t, s, **kwargs)
        np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, vis),
                                   atol=2e-5, rtol=2e-5)
        assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("bias_b,bias_n", [(1, 1), (2, 1), (1, 4), (2, 4)])
@pytest.mark.parametrize("kh", [4, 2, 1])
def test_bias(bias_b, bias_n, kh):
    b, t, s, n, h = 2, 5, 6, 4, 8
    q, k, v = make_qkv(b, t, s, n, kh, h, seed=kh)
    bias = np.random.default_rng(3).standard_normal((bias_b, bias_n, t, s)).astype(np.float32)
    out = attention(q, k, v, mask=Causal(), bias=jnp.asarray(bias))
    vis = naive_visible(PAIR["causal"], b, t, s)
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, vis, bias=bias),
                               atol=2e-5, rtol=2e-5)


def test_scale():
    q, k, v = make_qkv(2, 4, 6, 4, 2, 8)
    out = attention(q, k, v, mask=Local(2), scale=0.37)
    vis = naive_visible(PAIR["local2"], 2, 4, 6)
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, vis, scale=0.37),
                               atol=2e-5)


# --- GQA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,kh", [(4, 2), (8, 2), (4, 1), (6, 3)])
def test_gqa_equals_mha_with_repeated_kv(n, kh):
    b, t, s, h = 2, 5, 7, 8
    q, k, v = make_qkv(b, t, s, n, kh, h, seed=n + kh)
    g = n // kh
    out_gqa = attention(q, k, v, mask=Causal())
    # Head n reads kv head n // G, i.e. np.repeat along the head axis.
    k_mha, v_mha = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out_mha = attention(q, k_mha, v_mha, mask=Causal())
    np.testing.assert_allclose(np.asarray(out_gqa), np.asarray(out_mha), atol=1e-6, rtol=1e-6)
    w_gqa = attention_weights(q, k, mask=Causal())
    w_mha = attention_weights(q, k_mha, mask=Causal())
    np.testing.assert_allclose(np.asarray(w_gqa), np.asarray(w_mha), atol=1e-6)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                if hasattr(sub, "eqns"):  # Jaxpr
                    yield from _all_eqns(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # ClosedJaxpr
                    yield from _all_eqns(sub.jaxpr)


@pytest.mark.parametrize("kh", [2, 1])
def test_gqa_does_not_repeat_kv(kh):
    # Distinct primes-ish sizes so that only a repeated K/V has B*S*N*H elements.
    b, t, s, n, h = 2, 3, 5, 6, 7
    q, k, v = make_qkv(b, t, s, n, kh, h)
    bias = jnp.zeros((1, n, t, s), jnp.float32)
    forbidden = b * s * n * h
    for fn in (lambda q, k, v: attention(q, k, v, mask=Causal(), bias=bias),
               lambda q, k, v: jax.grad(
                   lambda q, k, v: attention(q, k, v, mask=Causal()).sum(),
                   argnums=(0, 1, 2))(q, k, v)):
        closed = jax.make_jaxpr(fn)(q, k, v)
        shapes = [tuple(var.aval.shape) for eqn in _all_eqns(closed.jaxpr)
                  for var in eqn.outvars if hasattr(var.aval, "shape")]
        assert shapes, "empty jaxpr?"
        bad = [shp for shp in shapes if math.prod(shp) == forbidden]
        assert not bad, f"an op materialises repeated K/V: {bad}"
        assert (b, s, n, h) not in shapes and (b, s, kh, n // kh, h) not in shapes


# --- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kh", [4, 2])
def test_bf16_in_bf16_out_close_to_fp32(kh):
    q, k, v = make_qkv(2, 6, 9, 4, kh, 16, seed=4)
    lengths = jnp.asarray([9, 5], jnp.int32)
    ref = attention(q, k, v, mask=Causal(), kv_lengths=lengths)
    qb, kb, vb = (jnp.asarray(x, dtype=jnp.bfloat16) for x in (q, k, v))
    out = attention(qb, kb, vb, mask=Causal(), kv_lengths=lengths)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, dtype=np.float32), np.asarray(ref),
                               atol=3e-2, rtol=3e-2)
    w = attention_weights(qb, kb, mask=Causal())
    assert w.dtype == jnp.float32


# --- positions -------------------------------------------------------------------------------

def test_default_positions_are_bottom_right():
    b, t, s = 2, 3, 7
    q, k, v = make_qkv(b, t, s, 4, 2, 8)
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    for mask in (Causal(), Local(2), Strided(2)):
        np.testing.assert_allclose(
            np.asarray(attention(q, k, v, mask=mask)),
            np.asarray(attention(q, k, v, mask=mask, q_positions=q_pos, kv_positions=kv_pos)),
            atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask_name", ["full", "causal", "local2"])
def test_custom_positions_match_naive(mask_name):
    # A decode step into a cache of 6 slots: batch 0 has 4 filled slots (two empty, -1),
    # batch 1 is a rolling buffer whose slots hold positions out of order.
    b, t, s, n, kh, h = 2, 1, 6, 4, 2, 8
    q, k, v = make_qkv(b, t, s, n, kh, h, seed=6)
    q_pos = np.array([[3], [8]], dtype=np.int32)
    kv_pos = np.array([[0, 1, 2, 3, -1, -1], [6, 7, 8, 3, 4, 5]], dtype=np.int32)
    out = attention(q, k, v, mask=MASKS[mask_name], q_positions=jnp.asarray(q_pos),
                              kv_positions=jnp.asarray(kv_pos))
    vis = naive_visible(PAIR[mask_name], b, t, s, q_positions=q_pos, kv_positions=kv_pos)
    assert not vis[0, :, 4:].any()  # empty slots are never visible, even under Full
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, vis), atol=2e-5)


def test_empty_slots_equal_dropping_them():
    # Attending over a cache with -1 slots equals attending over the filled prefix only.
    b, s, n, kh, h = 1, 8, 4, 1, 8
    q, k, v = make_qkv(b, 2, s, n, kh, h, seed=8)
    filled = 5
    kv_pos = np.where(np.arange(s) < filled, np.arange(s), -1).astype(np.int32)[None]
    q_pos = np.array([[3, 4]], dtype=np.int32)
    out = attention(q, k, v, mask=Causal(), q_positions=jnp.asarray(q_pos),
                              kv_positions=jnp.asarray(kv_pos))
    out_prefix = attention(q, k[:, :filled], v[:, :filled], mask=Causal())
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_prefix), atol=1e-6)
    # All slots empty: zeros.
    out = attention(q, k, v, q_positions=jnp.asarray(q_pos),
                              kv_positions=jnp.full((1, s), -1, jnp.int32))
    assert (np.asarray(out) == 0.0).all()


def test_visibility_matches_naive():
    b, t, s = 2, 4, 6
    rng = np.random.default_rng(3)
    seg = (_segments(b, t, rng, 2), _segments(b, s, rng, 2))
    lengths = np.array([6, 3], np.int32)
    kv_pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, -1, 3, 4, 5]], np.int32)
    got = reference.visibility(Local(1, 2), b, t, s,
                               segment_ids=tuple(jnp.asarray(x) for x in seg),
                               kv_lengths=jnp.asarray(lengths), kv_positions=jnp.asarray(kv_pos))
    want = naive_visible(PAIR["local1_2"], b, t, s, segment_ids=seg, kv_lengths=lengths,
                         kv_positions=kv_pos)
    np.testing.assert_array_equal(np.asarray(got), want)


# --- query blocks (the xla path's speed) -----------------------------------------------------

BLOCK_MASKS = dict(MASKS, bigbird=BigBird(4, random_blocks=1, seed=3))


@pytest.mark.parametrize("mask_name,t,s", [(name, 40, 40) for name in BLOCK_MASKS] + [
    ("causal", 24, 40), ("causal", 40, 24), ("local1_2", 24, 40), ("local1_2", 40, 24)])
def test_query_blocks_equal_one_block(mask_name, t, s):
    """Blocks of queries over the key range their mask reaches compute what one dense block
    computes, with segment ids, key lengths and a bias, forward and backward."""
    b, n, kh, h = 2, 4, 2, 8
    rng = np.random.default_rng(t + s)
    q, k, v = (jnp.asarray(x) for x in make_qkv(b, t, s, n, kh, h, seed=t))
    data = dict(segment_ids=(jnp.asarray(_segments(b, t, rng, 2)),
                             jnp.asarray(_segments(b, s, rng, 2))),
                kv_lengths=jnp.asarray([s, s - 7], jnp.int32),
                bias=jnp.asarray(rng.standard_normal((1, n, t, s)), jnp.float32))
    mask = BLOCK_MASKS[mask_name]
    blocks = reference.query_blocks(mask, b, t, s, n, aligned=True, block_q=8)
    assert len(blocks) == -(-t // 8)
    if mask_name == "causal":  # the first block's keys stop at its diagonal tile
        assert blocks[0][3] < s
    for kwargs in ({}, data) if (mask_name, t, s) == ("causal", 40, 40) else (data,):
        def loss(q, k, v, block_q):
            out = reference.attention(q, k, v, mask=mask, block_q=block_q, **kwargs)
            return (out * jnp.cos(out)).sum(), out
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
        (dq, dk, dv), out = grad(q, k, v, 8)
        (dq1, dk1, dv1), out1 = grad(q, k, v, t)
        for got, want in ((out, out1), (dq, dq1), (dk, dk1), (dv, dv1)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_query_block_that_sees_no_key_is_zero_with_zero_gradients():
    # Bottom-right causal with T > S: the first T - S queries sit before every key.
    b, t, s, n, kh, h = 1, 16, 4, 2, 1, 8
    q, k, v = (jnp.asarray(x) for x in make_qkv(b, t, s, n, kh, h, seed=1))
    blocks = reference.query_blocks(Causal(), b, t, s, n, aligned=True, block_q=4)
    assert blocks[0][2:] == (0, 0) and blocks[1][2:] == (0, 0)
    out = reference.attention(q, k, v, mask=Causal(), block_q=4)
    np.testing.assert_allclose(np.asarray(out),
                               naive_attention(q, k, v, naive_visible(PAIR["causal"], b, t, s)),
                               atol=2e-5)
    assert (np.asarray(out[:, :12]) == 0).all()
    dq = jax.grad(lambda q: reference.attention(q, k, v, mask=Causal(), block_q=4).sum())(q)
    assert (np.asarray(dq[:, :12]) == 0).all() and np.isfinite(np.asarray(dq)).all()


def test_default_blocks_follow_the_logits_budget():
    one = reference.query_blocks(Causal(), 2, 64, 64, 4, aligned=True)
    assert one == ((0, 64, 0, 64),)  # small: one dense block
    many = reference.query_blocks(Causal(), 8, 256, 256, 8, aligned=True)
    assert len(many) > 1 and many[-1][1:] == (256, 0, 256) and many[0][3] < 256
    assert len(reference.query_blocks(Full(), 1, 8192, 8192, 16, aligned=True)) <= 16
    unaligned = reference.query_blocks(Causal(), 8, 256, 256, 8, aligned=False)
    assert all(blk[2:] == (0, 256) for blk in unaligned)  # positions unknown: every key


# --- attention_weights -----------------------------------------------------------------------

@pytest.mark.parametrize("kh", [4, 2, 1])
def test_attention_weights_rows(kh):
    b, t, s, n, h = 2, 6, 4, 4, 8
    q, k, v = make_qkv(b, t, s, n, kh, h, seed=kh)
    lengths = jnp.asarray([4, 2], jnp.int32)
    w = np.asarray(attention_weights(q, k, mask=Causal(), kv_lengths=lengths))
    assert w.shape == (b, n, t, s) and w.dtype == np.float32
    vis = naive_visible(PAIR["causal"], b, t, s, kv_lengths=np.asarray(lengths))
    rows = w.sum(axis=-1)  # [B, N, T]
    want = np.broadcast_to(vis.any(-1)[:, None, :], rows.shape).astype(np.float32)
    np.testing.assert_allclose(rows, want, atol=1e-6)
    assert (w[~np.broadcast_to(vis[:, None], w.shape)] == 0.0).all()
    # Weights applied to V reproduce the attention output.
    g = n // kh
    v_heads = np.repeat(v, g, axis=2)  # [B, S, N, H]
    recon = np.einsum("bnts,bsnh->btnh", w, v_heads)
    out = np.asarray(attention(q, k, v, mask=Causal(), kv_lengths=lengths))
    np.testing.assert_allclose(recon, out, atol=1e-5)


# --- argument checks -------------------------------------------------------------------------

B, T, S, N, KH, H = 2, 3, 5, 4, 2, 8


def _arrays(q_shape=(B, T, N, H), k_shape=(B, S, KH, H), v_shape=(B, S, KH, H),
            dtypes=(jnp.float32,) * 3):
    return tuple(jnp.zeros(shp, dt) for shp, dt in zip((q_shape, k_shape, v_shape), dtypes))


@pytest.mark.parametrize("arrays,name", [
    (_arrays(q_shape=(B, T, N * H)), "q"),
    (_arrays(q_shape=(1, B, T, N, H)), "q"),
    (_arrays(k_shape=(B, S, H), v_shape=(B, S, H)), "k"),
    (_arrays(v_shape=(B, S, KH)), "v"),
    (_arrays(k_shape=(B + 1, S, KH, H), v_shape=(B + 1, S, KH, H)), "k"),
    (_arrays(k_shape=(B, S, 3, H), v_shape=(B, S, 3, H)), "num_kv_heads"),
    (_arrays(q_shape=(B, T, 5, H)), "num_heads"),
    (_arrays(k_shape=(B, S, KH, H + 2), v_shape=(B, S, KH, H + 2)), "head dim"),
    (_arrays(dtypes=(jnp.float32, jnp.bfloat16, jnp.float32)), "k.dtype"),
    (_arrays(dtypes=(jnp.bfloat16, jnp.float32, jnp.float32)), "q.dtype"),
    (_arrays(dtypes=(jnp.float32, jnp.float32, jnp.float16)), "v.dtype"),
])
def test_check_qkv_errors(arrays, name):
    with pytest.raises(ValueError, match=name):
        reference.attention(*arrays)
    with pytest.raises(ValueError, match=name):
        checks.check_qkv(*arrays)


def test_value_head_dim_is_an_ops_choice():
    """Values of their own head dim (MLA) pass where the op takes them (the reference) and
    are refused by name where it does not."""
    arrays = _arrays(v_shape=(B, S, KH, H + 1))
    assert reference.attention(*arrays).shape == (B, T, N, H + 1)
    with pytest.raises(ValueError, match="takes no value head dim"):
        checks.check_qkv(*arrays)
    assert checks.check_qkv(*arrays, value_dim=True) == (B, T, S, N, KH, H)


def test_check_qkv_returns_dims():
    assert checks.check_qkv(*_arrays()) == (B, T, S, N, KH, H)


def _good():
    return _arrays()


@pytest.mark.parametrize("kwargs,name", [
    ({"mask": "causal"}, "mask"),
    ({"segment_ids": jnp.zeros((B, T), jnp.int32)}, "segment_ids"),
    ({"segment_ids": (jnp.zeros((B, T), jnp.int32),)}, "segment_ids"),
    ({"segment_ids": (jnp.zeros((B, S), jnp.int32), jnp.zeros((B, S), jnp.int32))},
     "q_segment_ids"),
    ({"segment_ids": (jnp.zeros((B, T), jnp.int32), jnp.zeros((B, T), jnp.int32))},
     "kv_segment_ids"),
    ({"segment_ids": (jnp.zeros((T,), jnp.int32), jnp.zeros((B, S), jnp.int32))},
     "q_segment_ids"),
    ({"segment_ids": (jnp.zeros((B, T), jnp.float32), jnp.zeros((B, S), jnp.int32))},
     "q_segment_ids"),
    ({"kv_lengths": jnp.zeros((B, 1), jnp.int32)}, "kv_lengths"),
    ({"kv_lengths": jnp.zeros((B + 1,), jnp.int32)}, "kv_lengths"),
    ({"kv_lengths": jnp.zeros((B,), jnp.float32)}, "kv_lengths"),
    ({"q_positions": jnp.zeros((B, S), jnp.int32)}, "q_positions"),
    ({"kv_positions": jnp.zeros((B, T), jnp.int32)}, "kv_positions"),
    ({"kv_positions": jnp.zeros((B, S), jnp.float32)}, "kv_positions"),
    ({"bias": jnp.zeros((T, S), jnp.float32)}, "bias"),
    ({"bias": jnp.zeros((B, N, S, T), jnp.float32)}, "bias"),
    ({"bias": jnp.zeros((B, 3, T, S), jnp.float32)}, "bias"),
    ({"bias": jnp.zeros((B, KH, T, S), jnp.float32)}, "bias"),
    ({"bias": jnp.zeros((B + 1, N, T, S), jnp.float32)}, "bias"),
    ({"bias": jnp.zeros((1, 1, 1, T, S), jnp.float32)}, "bias"),
])
@pytest.mark.parametrize("fn", ["attention", "attention_weights"])
def test_argument_errors_name_the_parameter(kwargs, name, fn):
    q, k, v = _good()
    with pytest.raises(ValueError, match=name):
        if fn == "attention":
            reference.attention(q, k, v, **kwargs)
        else:
            reference.attention_weights(q, k, **kwargs)


def test_valid_optional_arguments_pass_checks():
    q, k, v = _good()
    out = reference.attention(
        q, k, v, mask=Causal(),
        segment_ids=(jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)),
        kv_lengths=jnp.full((B,), S, jnp.int32),
        bias=jnp.zeros((1, N, T, S), jnp.float32),
        q_positions=jnp.zeros((B, T), jnp.int32) + S - 1,
        kv_positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
    assert out.shape == q.shape
