"""kernels.flash_attention against kernels.reference.attention: outputs and q/k/v gradients.

``TestFlashAttention`` runs with ``interpret=None``: the Pallas interpreter on CPU, the compiled
Triton kernels on a GPU, with the same assertions. ``TestFlashAttentionInterpret`` is its
interpret-mode twin, only worth running where the base class is compiled (a GPU machine).
Shapes are small with 16/32-wide tiles so that ragged edges and many tiles exist cheaply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference, tiles
from tx.kernels.block_sizes import BlockSizes, default_block_sizes
from tx.kernels.flash_attention import flash_attention

# Different tiles per kernel, so each of the three lists (fwd, dq, dk/dv) is exercised.
SMALL = BlockSizes(block_q=16, block_k=32, block_q_dq=32, block_k_dq=16, block_q_dkv=16,
                   block_k_dkv=32)
# (atol, rtol) per dtype; an error must satisfy max|x - ref| <= atol + rtol * max|ref|.
TOL = {"float32": {"fwd": (1e-5, 1e-5), "grad": (1e-4, 1e-4)},
       "bfloat16": {"fwd": (2e-2, 2e-2), "grad": (2e-2, 2e-2)},
       "float16": {"fwd": (5e-3, 5e-3), "grad": (5e-3, 5e-3)}}
ON_GPU = jax.default_backend() == "gpu"


def _inputs(b, t, s, n, kh, h, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h), np.float32)
    k = rng.standard_normal((b, s, kh, h), np.float32)
    v = rng.standard_normal((b, s, kh, h), np.float32)
    do = rng.standard_normal((b, t, n, h), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, do))


def _documents(b, length, rng, p=0.06):
    """Random packed documents: ids increase at random boundaries."""
    return np.cumsum(rng.random((b, length)) < p, axis=1).astype(np.int32)


def _aligned_segments(b, t, s, seed=1):
    """Segment ids on key positions; a query takes the id of its (bottom-right) position."""
    rng = np.random.default_rng(seed)
    kv = _documents(b, max(s, t), rng)
    q = kv[:, max(s, t) - t:]
    return jnp.asarray(q), jnp.asarray(kv[:, :s])


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_grads(fn, q, k, v, do, **data):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **data), q, k, v)
    return (out, *vjp(do))


def _assert_close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    atol, rtol = tol
    err, bound = np.abs(got - want).max(), atol + rtol * np.abs(want).max()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
    return err


class TestFlashAttention:
    interpret = None

    def _compare(self, *, b=1, t=48, s=48, n=2, kh=2, h=32, mask=None, dtype=jnp.float32,
                 segment_ids=None, kv_lengths=None, block_sizes=SMALL, seed=0):
        q, k, v, do = _inputs(b, t, s, n, kh, h, dtype, seed)
        data = {}
        if segment_ids is not None:
            data["segment_ids"] = segment_ids
        if kv_lengths is not None:
            data["kv_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
        kernel = functools.partial(flash_attention, mask=mask, block_sizes=block_sizes,
                                   interpret=self.interpret)
        got = _value_and_grads(kernel, q, k, v, do, **data)
        # The reference runs in fp32 on the same (rounded) values: the error is the kernel's.
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        # Eager (op by op, cached per primitive) is faster than compiling the reference.
        out, vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, mask=mask, **data),
                           *f32[:3])
        want = (out, *vjp(f32[3]))
        tol = TOL[jnp.dtype(dtype).name]
        assert got[0].dtype == dtype and got[0].shape == q.shape
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            _assert_close(name, g, w, tol["fwd" if name == "out" else "grad"])
        return got

    # --- every mask kind and composition, ragged T and S, T != S ---

    @pytest.mark.parametrize("mask,t,s", [
        (M.Full(), 50, 50),
        (M.Causal(), 72, 72),
        (M.Causal(), 40, 72),             # chunked prefill: T < S, bottom-right
        (M.Causal(), 72, 40),             # T > S: early rows see nothing
        (M.Local(16), 90, 90),
        (M.Local(8, 8), 70, 70),
        (M.Local(0, 12), 64, 64),         # right-only window
        (M.Strided(8), 80, 80),
        (M.BigBird(16), 96, 80),
        (M.GlobalTokens((0, 33)) | M.Local(8, 8), 70, 70),
        (M.Strided(8) & M.Local(40), 80, 80),
        (M.Causal() & M.Local(24, 24), 60, 75),
    ], ids=lambda x: repr(x) if isinstance(x, M.Mask) else str(x))
    def test_masks(self, mask, t, s):
        self._compare(t=t, s=s, mask=mask)

    # --- GQA / MQA: one K/V load serves the whole group, no repeat ---

    @pytest.mark.parametrize("n,kh", [(4, 2), (8, 2), (8, 1), (6, 2)],
                             ids=["gqa2", "gqa4", "mqa8", "gqa3"])
    def test_gqa(self, n, kh):
        self._compare(t=40, s=56, n=n, kh=kh, mask=M.Causal())

    @pytest.mark.parametrize("h", [40, 64, 128])
    def test_head_dims(self, h):
        self._compare(t=33, s=47, h=h, n=2, kh=1, mask=M.Local(12, 3))

    # --- data: segment ids (packing) and key lengths (padding) ---

    @pytest.mark.parametrize("mask", [M.Causal(), M.Local(10)], ids=repr)
    def test_segment_ids(self, mask):
        self._compare(b=2, t=90, s=90, n=4, kh=2, mask=mask,
                      segment_ids=_aligned_segments(2, 90, 90))

    def test_segment_ids_prefill(self):
        self._compare(b=2, t=40, s=75, mask=M.Causal(), segment_ids=_aligned_segments(2, 40, 75))

    def test_kv_lengths_cross_attention(self):
        self._compare(b=3, t=37, s=70, mask=None, kv_lengths=[70, 33, 1])

    def test_segments_and_lengths(self):
        self._compare(b=2, t=64, s=64, n=4, kh=1, mask=M.Local(20),
                      segment_ids=_aligned_segments(2, 64, 64, seed=3), kv_lengths=[50, 17])

    # --- low precision ---

    @pytest.mark.parametrize("mask,n,kh,data", [
        (M.Causal(), 4, 1, False),
        (M.Local(16, 4), 4, 2, True),
    ], ids=["causal-mqa", "local-gqa-segments"])
    def test_bfloat16(self, mask, n, kh, data):
        seg = _aligned_segments(2, 64, 80) if data else None
        self._compare(b=2, t=64, s=80, n=n, kh=kh, h=64, mask=mask, dtype=jnp.bfloat16,
                      segment_ids=seg)

    def test_float16(self):
        self._compare(t=48, s=48, n=4, kh=2, mask=M.Causal(), dtype=jnp.float16)

    # --- rows that see nothing: zeros, zero grads, no NaN ---

    def test_fully_masked_rows(self):
        b, t, s = 2, 48, 48
        q_seg = np.zeros((b, t), np.int32)
        q_seg[0, 20:30] = 7                        # a document absent from the keys
        kv_seg = np.zeros((b, s), np.int32)
        out, dq, dk, dv = self._compare(b=b, t=t, s=s, mask=M.Causal(),
                                        segment_ids=(jnp.asarray(q_seg), jnp.asarray(kv_seg)),
                                        kv_lengths=[48, 0])
        for x in (out, dq):
            assert not np.asarray(x[0, 20:30]).any() and not np.asarray(x[1]).any()
        assert not np.asarray(dk[1]).any() and not np.asarray(dv[1]).any()

    def test_default_block_sizes_and_scale(self):
        q, k, v, _ = _inputs(1, 100, 100, 4, 2, 64, jnp.float32)
        got = flash_attention(q, k, v, mask=M.Causal(), scale=0.3, interpret=self.interpret)
        want = reference.attention(q, k, v, mask=M.Causal(), scale=0.3)
        _assert_close("out", got, want, TOL["float32"]["fwd"])

    # --- tile skipping ---

    def test_local_window_visits_few_tiles(self):
        t = s = 1024
        block = 64
        table = tiles.kv_block_lists(M.Local(64), t, s, block, block)
        num_q = t // block
        visited = tiles.visited_tiles(table)
        # Each query block meets its own and the previous key block: O(T * window / block^2).
        assert visited == 2 * num_q - 1, visited
        assert visited < num_q * num_q / 4
        assert tiles.visited_tiles(tiles.q_block_lists(M.Local(64), t, s, block, block)) \
            == visited
        # FULL tiles come first and skip masking: here the diagonal ones are partial.
        counts = np.asarray(table)
        assert (counts[:, tiles.NUM_FULL] == 0).all()
        q, k, v, _ = _inputs(1, t, s, 1, 1, 32, jnp.float32)
        bs = BlockSizes(*(6 * (block,)))
        got = flash_attention(q, k, v, mask=M.Local(64), block_sizes=bs,
                              interpret=self.interpret)
        want = reference.attention(q, k, v, mask=M.Local(64))
        _assert_close("out", got, want, TOL["float32"]["fwd"])


@pytest.mark.skipif(not ON_GPU, reason="on CPU the base class already runs in interpret mode")
class TestFlashAttentionInterpret(TestFlashAttention):
    interpret = True


# --- host-side visit lists -----------------------------------------------------------------------

def test_lists_cover_exactly_the_nonempty_tiles():
    for mask in (M.Causal(), M.BigBird(16), M.Local(8) | M.GlobalTokens((3,)), M.Strided(16)):
        t, s, bq, bk = 70, 90, 16, 32
        kinds = tiles.tile_kinds(mask, t, s, bq, bk)
        for table, grid in ((tiles.kv_block_lists(mask, t, s, bq, bk), kinds),
                            (tiles.q_block_lists(mask, t, s, bq, bk), kinds.T)):
            for row, row_kinds in zip(np.asarray(table), grid):
                nf, nt = row[tiles.NUM_FULL], row[tiles.NUM_TOTAL]
                listed = row[tiles.HEADER:tiles.HEADER + nt]
                assert list(listed[:nf]) == list(np.flatnonzero(row_kinds == M.FULL))
                assert list(listed[nf:]) == list(np.flatnonzero(row_kinds == M.PARTIAL))
            assert table.shape[1] & (table.shape[1] - 1) == 0  # power-of-two width


def test_ragged_edges_are_partial():
    kinds = tiles.tile_kinds(M.Full(), 40, 50, 16, 32)
    assert (kinds[:-1, :-1] == M.FULL).all()
    assert (kinds[-1] == M.PARTIAL).all() and (kinds[:, -1] == M.PARTIAL).all()


def test_segment_ids_and_lengths_narrow_the_lists():
    t = s = 128
    q_seg = np.repeat(np.arange(4, dtype=np.int32), 32)[None]  # 4 documents of 32
    table = tiles.narrowed_table(M.Causal(), t, s, 32, 32, transpose=False,
                                 segment_ids=(jnp.asarray(q_seg), jnp.asarray(q_seg)),
                                 kv_lengths=jnp.asarray([96], jnp.int32))
    table = np.asarray(table)[0]
    # Only the diagonal tiles survive (documents are block aligned), the last one at key 96
    # is dropped.
    assert list(table[:, tiles.NUM_TOTAL]) == [1, 1, 1, 0]
    assert list(table[:, tiles.HEADER][:3]) == [0, 1, 2]
    assert (table[:, tiles.KV_LEN] == 96).all()
    static = tiles.kv_block_lists(M.Causal(), t, s, 32, 32)
    assert tiles.visited_tiles(table) < tiles.visited_tiles(static)


def test_default_block_sizes_respect_row_budget():
    for fold in (1, 2, 4, 8, 16):
        bs = default_block_sizes(128, fold, "NVIDIA H100 80GB HBM3")
        assert bs.block_q * fold <= max(128, 16 * fold)
        assert bs.block_q >= 16


def test_kernels_lower_through_triton():
    """The same kernels lower to Triton IR for an NVIDIA target even on a CPU-only host."""
    q, k, v, do = _inputs(2, 40, 56, 8, 2, 64, jnp.bfloat16)
    seg = _aligned_segments(2, 40, 56)
    fn = functools.partial(flash_attention, mask=M.BigBird(16) | M.Causal(), interpret=False,
                           block_sizes=SMALL)
    lowered = _value_and_grads.trace(fn, q, k, v, do, segment_ids=seg,
                                     kv_lengths=jnp.asarray([56, 9], jnp.int32))
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3  # forward, dq and dk/dv kernels


# --- validation: every bad argument is a ValueError naming it ------------------------------------

def _qkv(t=32, s=32, n=4, kh=2, h=32, dtype=jnp.float32):
    return _inputs(1, t, s, n, kh, h, dtype)[:3]


@pytest.mark.parametrize("kwargs,match", [
    ({"block_sizes": BlockSizes(24, 32, 32, 32, 32, 32)}, "block_sizes.block_q=24"),
    ({"block_sizes": BlockSizes(16, 8, 32, 32, 32, 32)}, "block_sizes.block_k=8"),
    ({"block_sizes": BlockSizes(16, 16, 1024, 32, 32, 32)}, "block_sizes.block_q_dq=1024"),
    ({"block_sizes": (16, 16)}, "block_sizes="),
    ({"mask": "causal"}, "mask="),
    ({"scale": "big"}, "scale="),
    ({"segment_ids": jnp.zeros((1, 32), jnp.int32)}, "segment_ids must be a pair"),
    ({"segment_ids": (jnp.zeros((1, 31), jnp.int32), jnp.zeros((1, 32), jnp.int32))},
     "q_segment_ids.shape"),
    ({"segment_ids": (jnp.zeros((1, 32)), jnp.zeros((1, 32)))}, "q_segment_ids.dtype"),
    ({"kv_lengths": jnp.zeros((2,), jnp.int32)}, "kv_lengths"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        flash_attention(*_qkv(), **kwargs)


def test_bad_shapes_and_dtypes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="num_heads=4"):
        flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="dtypes must match"):
        flash_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="q.dtype=int32"):
        flash_attention(*(x.astype(jnp.int32) for x in (q, k, v)))
    big = _qkv(h=320)
    with pytest.raises(ValueError, match="head_dim=320"):
        flash_attention(*big)
