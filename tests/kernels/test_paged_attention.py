"""kernels.paged_attention against kernels.reference.paged_attention: the kernel's own
configurations (split-K, pages per block, padded head dims, longer sequences), page bounds,
validation and lowering. The kernel at its default configuration through the ``pallas``
backend (every mask kind a cache decodes with, modifiers, GQA, int8 pages, random block
tables with poisoned pages) is the conformance suite's (``tx.testing``, ``TestPallas``).

``TestPagedAttention`` runs with ``interpret=None``: the Pallas interpreter on CPU, the
compiled Triton kernel on a GPU, with the same assertions. Physical pages are shuffled so a
block table is never the identity; unused table entries and the pages a sequence must not
read are poisoned with NaN, so one stray load shows up as a NaN in the output.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference
from tx.kernels.paged_attention import page_bounds, paged_attention, visited_pages

_reference = jax.jit(reference.paged_attention, static_argnames=("mask", "scale"))
# (atol, rtol) per dtype; an error must satisfy max|x - ref| <= atol + rtol * max|ref|.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2)}


@dataclasses.dataclass(frozen=True)
class FarPast(M.Mask):
    """Sees only keys more than ``gap`` positions back: early queries see nothing."""

    gap: int

    def predicate(self, q_pos, kv_pos, kv_len):
        return kv_pos < q_pos - self.gap

    def band(self):
        return (-math.inf, -self.gap - 1)


def _pool(lengths, *, n=4, kh=2, h=32, page=8, max_pages=None, t=1, dtype=jnp.float32,
          seed=0):
    """Random q, shuffled pages; returns q, clean k/v pools, block tables, lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    pages_per_seq = -(-lengths // page)
    max_pages = max_pages or int(pages_per_seq.max())
    num_pages = int(pages_per_seq.sum()) + 3  # spare pages nobody owns
    order = rng.permutation(num_pages)
    table = np.full((len(lengths), max_pages), num_pages - 1, np.int32)
    owned = iter(order[order != num_pages - 1])  # the last page is the padding target
    for row, count in zip(table, pages_per_seq):
        row[:count] = [next(owned) for _ in range(count)]
    q_shape = (len(lengths), n, h) if t == 1 else (len(lengths), t, n, h)
    q = rng.standard_normal(q_shape, np.float32)
    k = rng.standard_normal((kh, num_pages, page, h), np.float32)
    v = rng.standard_normal((kh, num_pages, page, h), np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(table), jnp.asarray(lengths))


def _quantise(x, scale_dtype="float32"):
    """Symmetric int8 codes ``[K, P, L, H]`` and per-(kv head, token) scales ``[K, P, L]``."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1)
    scales = jnp.asarray(np.where(amax > 0, amax / 127, 1.0), scale_dtype)
    # Codes from the stored (possibly bf16-rounded) scale, so they use the full int8 range.
    codes = np.round(x / np.asarray(scales, np.float32)[..., None])
    return jnp.asarray(np.clip(codes, -127, 127), jnp.int8), scales


def _poison(k, v, table, lengths, mask, t, page):
    """NaN in every page the kernel must not read: spares, padding, outside the window."""
    first, stop = (np.asarray(x) for x in page_bounds(mask, lengths, t, page))
    keep = np.zeros(k.shape[1], bool)
    for row, lo, hi in zip(np.asarray(table), first, stop):
        keep[row[lo:hi]] = True
    bad = jnp.asarray(~keep)[None, :, None, None]
    return jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v)


def _assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "non-finite output: a poisoned page was read"
    atol, rtol = TOL[jnp.dtype(dtype).name]
    err, bound = np.abs(got - want).max(), atol + rtol * np.abs(want).max()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


# name: (lengths, n, kh, h, page, t, mask, split_k, pages_per_block, dtype)
CASES = {
    "mha_len1_boundary_ragged": ([1, 8, 13], 2, 2, 32, 8, 1, None, 1, 1, "float32"),
    "gqa4_causal_split": ([5, 16, 29], 8, 2, 32, 8, 1, M.Causal(), 3, 1, "float32"),
    "gqa8_boundary_blocks": ([16, 32], 8, 1, 32, 8, 1, M.Causal(), 1, 2, "float32"),
    "mqa_ragged_blocks_split": ([3, 40, 17], 4, 1, 32, 8, 1, None, 2, 4, "float32"),
    "gqa1_local_nosplit": ([1, 7, 45], 2, 2, 32, 4, 1, M.Local(9), 1, 2, "float32"),
    "gqa4_local_split": ([2, 33, 64], 8, 2, 32, 8, 1, M.Local(12), 4, 1, "float32"),
    "t3_causal_split": ([3, 9, 24], 4, 2, 32, 8, 3, M.Causal(), 2, 2, "float32"),
    "t4_local_gqa8": ([4, 20, 37], 8, 1, 32, 8, 4, M.Local(6), 1, 1, "float32"),
    "strided_unbanded": ([11, 30], 4, 2, 32, 8, 1, M.Strided(4), 2, 1, "float32"),
    "head_dim_24_padded": ([6, 19], 4, 2, 24, 8, 1, M.Causal(), 1, 1, "float32"),
    "bf16_gqa4_split": ([7, 32, 41], 8, 2, 32, 8, 1, M.Causal(), 2, 2, "bfloat16"),
    "bf16_local_t2": ([2, 24, 39], 4, 1, 32, 8, 2, M.Local(10), 1, 1, "bfloat16"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_matches_reference(case):
    lengths, n, kh, h, page, t, mask, split_k, ppb, dtype = CASES[case]
    q, k, v, table, lens = _pool(lengths, n=n, kh=kh, h=h, page=page, t=t, dtype=dtype,
                                 max_pages=-(-max(lengths) // page) + 1)
    want = _reference(q, k, v, table, lens, mask=mask)
    k_bad, v_bad = _poison(k, v, table, lens, mask, t, page)
    got = paged_attention(q, k_bad, v_bad, table, lens, mask=mask, split_k=split_k,
                          pages_per_block=ppb)
    assert got.dtype == q.dtype
    _assert_close(got, want, dtype)


def test_window_skips_pages():
    """The loop bounds of a sliding window cover the window's pages only."""
    lengths = jnp.asarray([1, 8, 9, 100, 256], jnp.int32)
    assert visited_pages(None, lengths, 1, 8) == 1 + 1 + 2 + 13 + 32
    assert visited_pages(M.Causal(), lengths, 1, 8) == 49
    # Local(15): keys length-16 .. length-1 -> at most 3 pages of 8 (2 when aligned).
    first, stop = (np.asarray(x) for x in page_bounds(M.Local(15), lengths, 1, 8))
    np.testing.assert_array_equal(first, [0, 0, 0, 10, 30])
    np.testing.assert_array_equal(stop, [1, 1, 2, 13, 32])
    assert visited_pages(M.Local(15), lengths, 1, 8) == 1 + 1 + 2 + 3 + 2
    # T new tokens widen the window by T - 1 keys.
    assert visited_pages(M.Local(15), jnp.asarray([256], jnp.int32), 9, 8) == 3


def test_window_output_ignores_far_pages():
    """A long sequence with a small window: every page outside it is NaN, output is finite."""
    q, k, v, table, lens = _pool([200, 5], n=4, kh=2, page=8)
    mask = M.Local(20)
    assert visited_pages(mask, lens, 1, 8) == 3 + 1  # keys 179..199: pages 22..24
    want = _reference(q, k, v, table, lens, mask=mask)
    k_bad, v_bad = _poison(k, v, table, lens, mask, 1, 8)
    assert int(jnp.isnan(k_bad[0, :, 0, 0]).sum()) >= 21
    for split_k in (1, 2):
        got = paged_attention(q, k_bad, v_bad, table, lens, mask=mask, split_k=split_k,
                              pages_per_block=2)
        _assert_close(got, want, "float32")


def test_rows_that_see_nothing_are_zero():
    q, k, v, table, lens = _pool([3, 40], n=4, kh=2, t=2, page=8)
    mask = FarPast(20)  # the first sequence sees nothing; the second sees keys < 19, 20
    got = paged_attention(q, k, v, table, lens, mask=mask, split_k=2, pages_per_block=1)
    want = _reference(q, k, v, table, lens, mask=mask)
    assert not np.asarray(got[0]).any()
    assert np.asarray(got[1]).any()
    _assert_close(got, want, "float32")


def test_split_k_agrees_with_no_split():
    q, k, v, table, lens = _pool([70, 3], n=4, kh=1, page=4)
    one = paged_attention(q, k, v, table, lens, mask=M.Causal(), split_k=1, pages_per_block=4)
    many = paged_attention(q, k, v, table, lens, mask=M.Causal(), split_k=5, pages_per_block=2)
    np.testing.assert_allclose(np.asarray(one), np.asarray(many), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [M.Causal(), M.Local(7)], ids=["causal", "local"])
def test_reference_equals_dense_attention_over_the_gathered_pages(mask, monkeypatch):
    """The reference's two ways (K-major pages into the dots as they lie; a long prefill
    transposed to ``[B, S, K, H]`` for the query-blocked ``attention``) against
    ``reference.attention`` over K/V gathered by hand, GQA 4:1 and ragged lengths."""
    t = 3
    q, k, v, table, lens = _pool([9, 30, 17], n=8, kh=2, t=t, max_pages=5)
    b, s = table.shape[0], table.shape[1] * 8
    slot = jnp.arange(s)[None, :]
    dense_k, dense_v = (x[:, table].reshape(2, b, s, 32).transpose(1, 2, 0, 3) for x in (k, v))
    want = reference.attention(q, dense_k, dense_v, mask=mask, kv_lengths=lens,
                               q_positions=lens[:, None] - t + jnp.arange(t)[None, :],
                               kv_positions=jnp.broadcast_to(slot, (b, s)))
    kv_major = reference.paged_attention(q, k, v, table, lens, mask=mask)
    monkeypatch.setattr(reference, "_BLOCK_LOGITS_BYTES", 0)  # every call is a "long prefill"
    blocked = reference.paged_attention(q, k, v, table, lens, mask=mask)
    _assert_close(kv_major, want, "float32")
    _assert_close(blocked, want, "float32")


def test_under_jit_skips_value_checks():
    q, k, v, table, lens = _pool([9, 12], n=4, kh=2, page=8)
    fn = jax.jit(lambda q, k, v, t, l: paged_attention(q, k, v, t, l, mask=M.Causal()))
    want = _reference(q, k, v, table, lens, mask=M.Causal())
    _assert_close(fn(q, k, v, table, lens), want, "float32")


def _bad(**changes):
    q, k, v, table, lens = _pool([5, 12], n=4, kh=2, page=8)
    args = dict(q=q, k_pages=k, v_pages=v, block_tables=table, lengths=lens)
    kwargs = changes.pop("kwargs", {})
    args.update(changes)
    return args, kwargs


BAD = {
    "q_rank": (dict(q=jnp.zeros((2, 32))), "q.shape"),
    "kv_rank": (dict(k_pages=jnp.zeros((4, 8, 32))), "k_pages.shape"),
    "kv_mismatch": (dict(v_pages=jnp.zeros((2, 5, 8, 32))), "v_pages.shape"),
    "heads": (dict(q=jnp.zeros((2, 3, 32))), "num_heads=3"),
    "head_dim": (dict(q=jnp.zeros((2, 4, 16))), "head dim"),
    "dtype": (dict(q=jnp.zeros((2, 4, 32), jnp.bfloat16)), "dtypes must match"),
    "int_dtype": (dict(q=jnp.zeros((2, 4, 32), jnp.int32),
                       k_pages=jnp.zeros((2, 6, 8, 32), jnp.int32),
                       v_pages=jnp.zeros((2, 6, 8, 32), jnp.int32)), "q.dtype"),
    "page_size": (dict(k_pages=jnp.zeros((2, 6, 6, 32)), v_pages=jnp.zeros((2, 6, 6, 32))),
                  "power of two"),
    "table_dtype": (dict(block_tables=jnp.zeros((2, 2), jnp.float32)), "block_tables.dtype"),
    "table_shape": (dict(block_tables=jnp.zeros((3, 2), jnp.int32)), "block_tables.shape"),
    "lengths_shape": (dict(lengths=jnp.zeros((3,), jnp.int32)), "lengths.shape"),
    "lengths_dtype": (dict(lengths=jnp.asarray([5, 12], jnp.int64)
                           if jax.config.jax_enable_x64 else jnp.asarray([5., 12.])),
                      "lengths.dtype"),
    "page_id_high": (dict(block_tables=jnp.asarray([[0, 9], [1, 99]], jnp.int32)),
                     "block_tables[1, 1]=99"),
    "page_id_negative": (dict(block_tables=jnp.asarray([[-1, 0], [1, 2]], jnp.int32)),
                         "block_tables[0, 0]=-1"),
    "length_too_long": (dict(lengths=jnp.asarray([5, 17], jnp.int32)), "lengths[1]=17"),
    "length_zero": (dict(lengths=jnp.asarray([0, 12], jnp.int32)), "lengths[0]=0"),
    "length_below_t": (dict(q=jnp.zeros((2, 6, 4, 32)), lengths=jnp.asarray([5, 12],
                                                                            jnp.int32)),
                       "lengths[0]=5"),
    "split_k": (dict(kwargs=dict(split_k=0)), "split_k=0"),
    "pages_per_block": (dict(kwargs=dict(pages_per_block=3)), "pages_per_block=3"),
    "scale": (dict(kwargs=dict(scale="x")), "scale="),
    "mask": (dict(kwargs=dict(mask="causal")), "mask="),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_validation_errors(case):
    changes, match = BAD[case]
    args, kwargs = _bad(**dict(changes))
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        paged_attention(**args, **kwargs)


def test_padding_entries_past_length_are_not_validated():
    """Entries past a sequence's pages may hold anything (e.g. -1): never read."""
    q, k, v, table, lens = _pool([5, 12], n=4, kh=2, page=8, max_pages=3)
    padded = table.at[:, 2].set(-1).at[0, 1].set(12345)
    got = paged_attention(q, k, v, padded, lens)
    _assert_close(got, _reference(q, k, v, table, lens), "float32")


# name: (n, kh, h, page, t, mask, split_k, pages_per_block, dtype, scales dtype or None)
# A scales dtype means int8 pages with per-token scales, dequantised in the kernel.
LOWERED = {
    "mha_nosplit": (2, 2, 32, 16, 1, None, 1, 1, "float32", None),
    "gqa4_causal_split": (8, 2, 64, 8, 1, M.Causal(), 3, 2, "bfloat16", None),
    "mqa_local_t3": (4, 1, 32, 16, 3, M.Local(12), 2, 1, "float32", None),
    "strided_head_dim_24": (4, 2, 24, 8, 2, M.Strided(4), 1, 4, "bfloat16", None),
    "int8_gqa4_f32_scales": (8, 2, 64, 8, 1, M.Causal(), 1, 2, "bfloat16", "float32"),
    "int8_mqa_bf16_scales_split": (4, 1, 32, 16, 1, M.Local(12), 2, 1, "float32",
                                   "bfloat16"),
    "int8_t3_head_dim_24_split": (4, 2, 24, 8, 3, None, 3, 4, "float16", "float32"),
}


@pytest.mark.parametrize("case", LOWERED, ids=list(LOWERED))
def test_kernel_lowers_through_triton(case):
    """Every kernel configuration (split-K merge, several new tokens, each mask kind, padded
    head dim, int8 pages) lowers to Triton for an NVIDIA target even on a CPU-only host."""
    n, kh, h, page, t, mask, split_k, ppb, dtype, scales_dtype = LOWERED[case]
    q, k, v, table, lens = _pool([5, 40, 17], n=n, kh=kh, h=h, page=page, t=t, dtype=dtype)
    scales = ()
    if scales_dtype is not None:
        (k, k_scales), (v, v_scales) = _quantise(k, scales_dtype), _quantise(v, scales_dtype)
        scales = (k_scales, v_scales)
    fn = jax.jit(lambda q, k, v, table, lens, *s: paged_attention(
        q, k, v, table, lens, mask=mask, split_k=split_k, pages_per_block=ppb,
        interpret=False, **dict(zip(("k_scales", "v_scales"), s))))
    text = fn.trace(q, k, v, table, lens, *scales).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
