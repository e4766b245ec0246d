"""Mask algebra: dense() against brute force, tile maps against dense(), jit-traceable
predicates, value semantics and constructor validation.

The brute-force definitions below are written from the documented semantics with scalar
Python, one (query, key) pair at a time, independently of ``kernels/masks.py``.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tx.kernels import masks
from tx.kernels.masks import (EMPTY, FULL, PARTIAL, And, BigBird, Causal, Full, GlobalTokens,
                           Local, Or, Strided)


# --- brute force -----------------------------------------------------------------------------

def brute(pair_visible, q_len, kv_len):
    """Dense [T, S] from a scalar predicate on positions, bottom-right aligned."""
    out = np.zeros((q_len, kv_len), dtype=bool)
    for i in range(q_len):
        qp = i + kv_len - q_len  # last query sits at the last key
        for j in range(kv_len):
            out[i, j] = bool(pair_visible(qp, j))
    return out


def bf_full(qp, kp):
    return True


def bf_causal(qp, kp):
    return kp <= qp


def bf_local(left, right):
    return lambda qp, kp: qp - left <= kp <= qp + right


def bf_strided(stride):
    def f(qp, kp):
        behind = qp - kp
        if behind < 0:
            return False
        return behind < stride or behind % stride == 0
    return f


def bf_global(indices):
    # Every query sees the global keys, including queries at negative positions (those
    # exist only when q_len > kv_len).
    def f(qp, kp):
        return qp in indices or kp in indices
    return f


def bf_bigbird_static(block, window_blocks, global_blocks):
    """Sliding + global parts of BigBird (no random blocks)."""
    def f(qp, kp):
        qb, kb = qp // block, kp // block
        return (abs(qb - kb) <= window_blocks // 2 or qb < global_blocks
                or kb < global_blocks)
    return f


SHAPES = [(1, 1), (5, 5), (7, 7), (3, 9), (1, 9), (9, 3), (12, 5), (16, 16), (13, 21)]


# --- dense() against brute force -------------------------------------------------------------

@pytest.mark.parametrize("q_len,kv_len", SHAPES)
def test_full_dense(q_len, kv_len):
    np.testing.assert_array_equal(Full().dense(q_len, kv_len), brute(bf_full, q_len, kv_len))
    assert Full().dense(q_len, kv_len).all()


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
def test_causal_dense(q_len, kv_len):
    d = Causal().dense(q_len, kv_len)
    assert d.shape == (q_len, kv_len) and d.dtype == bool
    np.testing.assert_array_equal(d, brute(bf_causal, q_len, kv_len))


def test_causal_bottom_right_alignment_explicit():
    # q_len < kv_len: the last query sees every key; the first sees kv_len - q_len + 1 keys.
    d = Causal().dense(3, 6)
    np.testing.assert_array_equal(d.sum(axis=1), [4, 5, 6])
    assert d[-1].all()
    # q_len > kv_len: the first q_len - kv_len queries see nothing; the last sees all keys.
    d = Causal().dense(6, 3)
    np.testing.assert_array_equal(d.sum(axis=1), [0, 0, 0, 1, 2, 3])
    # Decode: one query sees the whole cache.
    assert Causal().dense(1, 11).all()


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("left,right", [(0, 0), (1, 0), (3, 0), (2, 2), (0, 3), (1, 4), (20, 0)])
def test_local_dense(q_len, kv_len, left, right):
    np.testing.assert_array_equal(Local(left, right).dense(q_len, kv_len),
                                  brute(bf_local(left, right), q_len, kv_len))


def test_local_window_sizes():
    # Local(W - 1) on a square is the causal window of W keys.
    d = Local(3).dense(10, 10)
    np.testing.assert_array_equal(d.sum(axis=1), [1, 2, 3, 4, 4, 4, 4, 4, 4, 4])
    # Local(w, w) is symmetric.
    d = Local(2, 2).dense(9, 9)
    np.testing.assert_array_equal(d, d.T)
    # Local(huge) on a square is Causal.
    np.testing.assert_array_equal(Local(100).dense(8, 8), Causal().dense(8, 8))


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_strided_dense(q_len, kv_len, stride):
    np.testing.assert_array_equal(Strided(stride).dense(q_len, kv_len),
                                  brute(bf_strided(stride), q_len, kv_len))


def test_strided_two_hops_cover_the_past():
    # Sparse Transformer property: any key j <= i is reachable from i in at most two hops.
    s, n = 4, 20
    d = Strided(s).dense(n, n).astype(np.int64)
    two_hop = (d @ d) > 0
    np.testing.assert_array_equal(two_hop | d.astype(bool), Causal().dense(n, n))


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("indices", [(0,), (0, 3), (2, 5, 7), (100,)])
def test_global_tokens_dense(q_len, kv_len, indices):
    np.testing.assert_array_equal(GlobalTokens(indices).dense(q_len, kv_len),
                                  brute(bf_global(indices), q_len, kv_len))


def test_global_tokens_rows_and_columns():
    d = GlobalTokens((0, 3)).dense(8, 8).copy()  # dense() may be a read-only view
    assert d[:, 0].all() and d[:, 3].all() and d[0].all() and d[3].all()
    d[:, [0, 3]] = False
    d[[0, 3]] = False
    assert not d.any()


@pytest.mark.parametrize("q_len,kv_len", [(16, 16), (10, 24), (24, 10), (13, 29), (1, 17)])
@pytest.mark.parametrize("block,window,glob", [(4, 3, 1), (2, 1, 0), (3, 5, 2), (4, 2, 1)])
def test_bigbird_static_part(q_len, kv_len, block, window, glob):
    # random_blocks=0 leaves exactly the sliding + global parts.
    mask = BigBird(block, window_blocks=window, global_blocks=glob, random_blocks=0)
    np.testing.assert_array_equal(mask.dense(q_len, kv_len),
                                  brute(bf_bigbird_static(block, window, glob), q_len, kv_len))


def _random_picks(mask: BigBird, q_len, kv_len):
    """{query block: set of key blocks added by the random part} for non-negative queries
    (negative ones exist only when q_len > kv_len)."""
    base = dataclasses.replace(mask, random_blocks=0).dense(q_len, kv_len)
    full = mask.dense(q_len, kv_len)
    assert not (base & ~full).any(), "random blocks removed a visible pair"
    extra = full & ~base
    picks = {}
    num_kv_blocks = -(-kv_len // mask.block)
    for i in range(q_len):
        qp = i + kv_len - q_len
        if qp < 0:
            continue
        qb = qp // mask.block
        cols = {j // mask.block for j in np.flatnonzero(extra[i])}
        # Whole key blocks only: every in-range key of a picked block is visible.
        for kb in cols:
            assert kb < num_kv_blocks
            assert full[i, kb * mask.block:(kb + 1) * mask.block].all()
        picks.setdefault(qb, []).append(frozenset(cols))
    # Every query of a query block gets the same random key blocks.
    for qb, sets in picks.items():
        assert len(set(sets)) == 1, f"query block {qb} rows disagree: {sets}"
    return {qb: sets[0] for qb, sets in picks.items()}


def _brute_pick_candidates(mask: BigBird, q_len, kv_len):
    """Random picks measured directly on a mask whose static part is only the diagonal."""
    probe = dataclasses.replace(mask, window_blocks=1, global_blocks=0)
    d = probe.dense(q_len, kv_len)
    out = {}
    for i in range(q_len):
        qp = i + kv_len - q_len
        if qp < 0:
            continue
        qb = qp // mask.block
        seen = {j // mask.block for j in np.flatnonzero(d[i])}
        out[qb] = seen  # the diagonal block plus up to random_blocks picks
    return out


@pytest.mark.parametrize("random_blocks", [1, 2, 3])
@pytest.mark.parametrize("q_len,kv_len", [(64, 64), (40, 64), (64, 40), (37, 53)])
def test_bigbird_random_blocks(random_blocks, q_len, kv_len):
    block = 4
    mask = BigBird(block, window_blocks=3, global_blocks=1, random_blocks=random_blocks, seed=7)
    picks = _random_picks(mask, q_len, kv_len)
    candidates = _brute_pick_candidates(mask, q_len, kv_len)
    static = bf_bigbird_static(block, 3, 1)
    num_kv_blocks = -(-kv_len // block)
    for qb, added in picks.items():
        # The probe sees the diagonal block plus the draws: at most random_blocks of them.
        draws = candidates[qb] - {qb}
        assert qb < num_kv_blocks and qb in candidates[qb]
        assert len(draws) <= random_blocks
        # The random part adds exactly the drawn blocks the sliding/global parts lack.
        static_blocks = {kb for kb in range(num_kv_blocks) if static(qb * block, kb * block)}
        assert added == candidates[qb] - static_blocks, (qb, added, candidates[qb])
    # With 16 key blocks the draws are not degenerate.
    if kv_len == 64:
        sizes = [len(candidates[qb]) - 1 for qb in candidates]
        assert max(sizes) >= 1
        assert sum(sizes) >= len(sizes) * random_blocks // 2
        drawn_anywhere = set().union(*candidates.values())
        assert len(drawn_anywhere) >= 8


def test_bigbird_random_blocks_nest_and_depend_only_on_key_length():
    mask1 = BigBird(4, random_blocks=1, seed=3)
    mask3 = BigBird(4, random_blocks=3, seed=3)
    d1, d3 = mask1.dense(48, 48), mask3.dense(48, 48)
    assert not (d1 & ~d3).any(), "draw r is shared by every random_blocks > r"
    # Fixed for a given key length: a shorter query chunk sees the same rows.
    np.testing.assert_array_equal(mask3.dense(20, 48), d3[-20:])
    np.testing.assert_array_equal(mask3.dense(1, 48), d3[-1:])


def test_bigbird_deterministic_and_seeded():
    a = BigBird(4, random_blocks=2, seed=11).dense(64, 64)
    b = BigBird(4, random_blocks=2, seed=11).dense(64, 64)
    np.testing.assert_array_equal(a, b)
    others = [BigBird(4, random_blocks=2, seed=s).dense(64, 64) for s in (0, 1, 12, 1000)]
    assert all(not np.array_equal(a, o) for o in others)
    # random_blocks=0 ignores the seed.
    np.testing.assert_array_equal(BigBird(4, random_blocks=0, seed=1).dense(32, 32),
                                  BigBird(4, random_blocks=0, seed=2).dense(32, 32))


COMPOSITIONS = [
    (Causal() & Local(3), lambda qp, kp: bf_causal(qp, kp) and bf_local(3, 0)(qp, kp)),
    (Local(2, 2) | GlobalTokens((0,)),
     lambda qp, kp: bf_local(2, 2)(qp, kp) or bf_global((0,))(qp, kp)),
    (Causal() & Strided(3), lambda qp, kp: bf_causal(qp, kp) and bf_strided(3)(qp, kp)),
    (Causal() & (Local(4) | GlobalTokens((1, 2))),
     lambda qp, kp: bf_causal(qp, kp) and (bf_local(4, 0)(qp, kp) or bf_global((1, 2))(qp, kp))),
    (Local(1, 1) | Strided(4), lambda qp, kp: bf_local(1, 1)(qp, kp) or bf_strided(4)(qp, kp)),
    (Local(5, 2) & Local(1, 6), lambda qp, kp: bf_local(1, 2)(qp, kp)),
    (Full() & Causal(), bf_causal),
    (Full() | Causal(), bf_full),
    (Causal() & BigBird(2, random_blocks=0),
     lambda qp, kp: bf_causal(qp, kp) and bf_bigbird_static(2, 3, 1)(qp, kp)),
]


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("idx", range(len(COMPOSITIONS)))
def test_compositions_dense(q_len, kv_len, idx):
    mask, bf = COMPOSITIONS[idx]
    np.testing.assert_array_equal(mask.dense(q_len, kv_len), brute(bf, q_len, kv_len))


def test_compositions_are_and_or():
    assert isinstance(Causal() & Local(3), And)
    assert isinstance(Causal() | Local(3), Or)
    a, b = Strided(3), Local(2, 1)
    for q_len, kv_len in SHAPES:
        np.testing.assert_array_equal((a & b).dense(q_len, kv_len),
                                      a.dense(q_len, kv_len) & b.dense(q_len, kv_len))
        np.testing.assert_array_equal((a | b).dense(q_len, kv_len),
                                      a.dense(q_len, kv_len) | b.dense(q_len, kv_len))


# --- tile maps -------------------------------------------------------------------------------

def _leaf_masks():
    return st.one_of(
        st.just(Full()),
        st.just(Causal()),
        st.builds(Local, st.integers(0, 12), st.integers(0, 6)),
        st.builds(Strided, st.integers(1, 6)),
        st.builds(GlobalTokens, st.lists(st.integers(0, 30), min_size=1, max_size=3).map(tuple)),
        st.builds(BigBird, st.integers(1, 6), st.integers(1, 4), st.integers(0, 2),
                  st.integers(0, 2), st.integers(0, 5)),
    )


MASK_STRATEGY = st.recursive(
    _leaf_masks(),
    lambda children: st.one_of(st.builds(And, children, children),
                               st.builds(Or, children, children)),
    max_leaves=3,
)


def expected_tile_map(dense, block_q, block_k):
    q_len, kv_len = dense.shape
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    out = np.empty((nq, nk), dtype=np.int8)
    for a in range(nq):
        for c in range(nk):
            tile = dense[a * block_q:(a + 1) * block_q, c * block_k:(c + 1) * block_k]
            out[a, c] = FULL if tile.all() else (PARTIAL if tile.any() else EMPTY)
    return out


def check_tile_map(mask, q_len, kv_len, block_q, block_k):
    tm = mask.tile_map(q_len, kv_len, block_q, block_k)
    dense = mask.dense(q_len, kv_len)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    assert tm.shape == (nq, nk)
    assert set(np.unique(tm)) <= {EMPTY, PARTIAL, FULL}
    for a in range(nq):
        for c in range(nk):
            tile = dense[a * block_q:(a + 1) * block_q, c * block_k:(c + 1) * block_k]
            if tm[a, c] == EMPTY:  # sound: skipping it loses nothing
                assert not tile.any(), (mask, a, c)
            elif tm[a, c] == FULL:  # sound: dropping per-element masking shows nothing extra
                assert tile.all(), (mask, a, c)
            else:  # exact: a partial tile really is mixed
                assert tile.any() and not tile.all(), (mask, a, c)
    np.testing.assert_array_equal(tm, expected_tile_map(dense, block_q, block_k))


@settings(max_examples=300, deadline=None)
@given(mask=MASK_STRATEGY, q_len=st.integers(1, 40), kv_len=st.integers(1, 40),
       block_q=st.integers(1, 16), block_k=st.integers(1, 16))
def test_tile_map_matches_dense(mask, q_len, kv_len, block_q, block_k):
    check_tile_map(mask, q_len, kv_len, block_q, block_k)


@pytest.mark.parametrize("mask", [Full(), Causal(), Local(7), Local(3, 5), Strided(4),
                                  GlobalTokens((0, 9)), BigBird(8, random_blocks=2),
                                  Causal() & Local(16), Local(4, 4) | GlobalTokens((0,))])
@pytest.mark.parametrize("q_len,kv_len,block_q,block_k",
                         [(64, 64, 16, 16), (64, 64, 16, 8), (50, 70, 16, 32), (70, 50, 8, 16),
                          (1, 65, 1, 16), (33, 33, 32, 32), (17, 9, 4, 4), (5, 5, 64, 64)])
def test_tile_map_fixed_cases(mask, q_len, kv_len, block_q, block_k):
    check_tile_map(mask, q_len, kv_len, block_q, block_k)


def test_tile_map_examples():
    # Causal on a square with square tiles: lower triangle full, diagonal partial.
    tm = Causal().tile_map(8, 8, 4, 4)
    np.testing.assert_array_equal(tm, [[PARTIAL, EMPTY], [FULL, PARTIAL]])
    # A ragged last tile is FULL when every in-range pair is visible.
    np.testing.assert_array_equal(Full().tile_map(5, 7, 4, 4), np.full((2, 2), FULL))
    # Causal decode step: one query row sees every key tile in full.
    np.testing.assert_array_equal(Causal().tile_map(1, 10, 8, 4), [[FULL, FULL, FULL]])


def test_tile_map_is_read_only_and_cached():
    tm = Local(3).tile_map(32, 32, 8, 8)
    with pytest.raises(ValueError):
        tm[0, 0] = FULL
    assert Local(3).tile_map(32, 32, 8, 8) is tm


@pytest.mark.parametrize("args", [(0, 8, 4, 4), (8, 0, 4, 4), (8, 8, 0, 4), (8, 8, 4, -1)])
def test_tile_map_rejects_bad_sizes(args):
    names = ["q_len", "kv_len", "block_q", "block_k"]
    bad = names[[a < 1 for a in args].index(True)]
    with pytest.raises(ValueError, match=bad):
        Causal().tile_map(*args)


# --- predicate under jit ---------------------------------------------------------------------

PREDICATE_MASKS = [Full(), Causal(), Local(3), Local(2, 4), Strided(3), GlobalTokens((0, 5)),
                   BigBird(4), BigBird(3, window_blocks=5, global_blocks=2, random_blocks=3,
                                    seed=123456),
                   Causal() & Strided(2), Local(1, 1) | GlobalTokens((2,)),
                   Causal() & (BigBird(2, random_blocks=2) | Local(5))]


@pytest.mark.parametrize("mask", PREDICATE_MASKS)
@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (4, 13), (13, 4), (1, 40)])
def test_predicate_jit_matches_numpy(mask, q_len, kv_len):
    q_pos, kv_pos = masks.aligned_positions(q_len, kv_len)
    np_out = np.broadcast_to(mask.predicate(q_pos[:, None], kv_pos[None, :], kv_len),
                             (q_len, kv_len))
    jit_fn = jax.jit(lambda qp, kp: mask.predicate(qp, kp, kv_len))
    jax_out = jit_fn(jnp.asarray(q_pos)[:, None], jnp.asarray(kv_pos)[None, :])
    jax_out = np.broadcast_to(np.asarray(jax_out), (q_len, kv_len))
    np.testing.assert_array_equal(jax_out, np_out)
    np.testing.assert_array_equal(np_out, mask.dense(q_len, kv_len))


@pytest.mark.parametrize("mask", PREDICATE_MASKS)
def test_predicate_jit_matches_numpy_arbitrary_positions(mask):
    # Positions as an inference cache would pass them: arbitrary, large, some negative.
    rng = np.random.default_rng(0)
    q_pos = rng.integers(-5, 5000, size=(3, 17, 1)).astype(np.int32)
    kv_pos = rng.integers(-5, 5000, size=(3, 1, 23)).astype(np.int32)
    kv_len = 5000
    np_out = np.broadcast_to(mask.predicate(q_pos, kv_pos, kv_len), (3, 17, 23))
    jax_out = jax.jit(lambda a, b: mask.predicate(a, b, kv_len))(q_pos, kv_pos)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(jax_out), (3, 17, 23)), np_out)


def test_mask_is_a_static_jit_argument():
    calls = []

    @jax.jit
    def inner(x):
        return x

    def f(mask, x):
        calls.append(mask)
        q_pos, kv_pos = jnp.arange(4)[:, None], jnp.arange(4)[None, :]
        return jnp.where(mask.predicate(q_pos, kv_pos, 4), x, 0.0)

    g = jax.jit(f, static_argnums=0)
    x = jnp.ones((4, 4))
    g(Local(1), x)
    g(Local(1), x)  # equal value: cache hit, no retrace
    assert len(calls) == 1
    out = g(Causal(), x)
    assert len(calls) == 2
    np.testing.assert_array_equal(np.asarray(out), Causal().dense(4, 4).astype(np.float32))


# --- value semantics and validation ----------------------------------------------------------

def test_masks_hashable_frozen_equal_by_value():
    pairs = [
        (Full(), Full()), (Causal(), Causal()), (Local(3, 1), Local(3, 1)),
        (Local(3), Local(3, 0)), (Strided(4), Strided(4)),
        (GlobalTokens((3, 1)), GlobalTokens((1, 3, 3))), (GlobalTokens([0, 2]), GlobalTokens((2, 0))),
        (BigBird(8, seed=2), BigBird(8, 3, 1, 1, 2)),
        (Causal() & Local(4), Causal() & Local(4)),
        (Local(2, 2) | GlobalTokens((0,)), Local(2, 2) | GlobalTokens((0,))),
    ]
    for a, b in pairs:
        assert a == b and hash(a) == hash(b)
        assert a is not b
        assert len({a, b}) == 1
    distinct = [Full(), Causal(), Local(3), Local(3, 1), Local(4), Strided(3), Strided(4),
                GlobalTokens((0,)), GlobalTokens((1,)), BigBird(8), BigBird(8, seed=1),
                BigBird(4), Causal() & Local(3), Causal() | Local(3), Local(3) & Causal()]
    for a, b in itertools.combinations(distinct, 2):
        assert a != b, (a, b)
    assert len(set(distinct)) == len(distinct)
    for m in [Local(3), Strided(2), GlobalTokens((1,)), BigBird(4), Causal() & Local(2)]:
        field = dataclasses.fields(m)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(m, field, getattr(m, field))


@pytest.mark.parametrize("make,field", [
    (lambda: Local(-1), "left"),
    (lambda: Local(2, -1), "right"),
    (lambda: Local(1.5), "left"),
    (lambda: Local(True), "left"),
    (lambda: Strided(0), "stride"),
    (lambda: Strided(-2), "stride"),
    (lambda: BigBird(block=0), "block"),
    (lambda: BigBird(4, window_blocks=0), "window_blocks"),
    (lambda: BigBird(4, global_blocks=-1), "global_blocks"),
    (lambda: BigBird(4, random_blocks=-1), "random_blocks"),
    (lambda: BigBird(4, seed=-1), "seed"),
    (lambda: GlobalTokens(()), "indices"),
    (lambda: GlobalTokens(-3), "indices"),
    (lambda: GlobalTokens(3), "indices"),
    (lambda: GlobalTokens((0, -1)), "indices"),
])
def test_constructors_reject_bad_values(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


def test_composition_with_non_mask_raises():
    with pytest.raises(TypeError):
        Causal() & 3
    with pytest.raises(TypeError):
        Causal() | "causal"
    with pytest.raises(TypeError):
        3 & Causal()


@pytest.mark.parametrize("mask", PREDICATE_MASKS + [Local(0)])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (5, 19), (19, 5), (1100, 30)])
def test_density_equals_dense_mean(mask, q_len, kv_len):
    expected = mask.dense(q_len, kv_len).mean()
    assert masks.density(mask, q_len, kv_len) == pytest.approx(expected, abs=1e-12)
