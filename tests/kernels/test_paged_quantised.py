"""kernels.paged_attention on int8 pages with per-token scales, against the reference on the
same codes and scales.

Kernel and reference see identical quantised pages, so they must agree to fp32 rounding (bf16
rounding for bf16 q), not merely to quantisation error. Codes cannot hold NaN, so the pages a
sequence must not read get NaN *scales*: one stray read, or one empty page whose scale is
multiplied in before it is masked, shows up as a NaN in the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference
from tx.kernels.paged_attention import paged_attention
from tests.kernels.test_paged_attention import _assert_close, _poison, _pool, _quantise

_reference = jax.jit(reference.paged_attention, static_argnames=("mask", "scale"))


def _quantised_pool(lengths, *, scale_dtype="float32", **kwargs):
    """``_pool`` with int8 K/V: q, k codes, v codes, table, lengths, k scales, v scales."""
    q, k, v, table, lens = _pool(lengths, **kwargs)
    (k, k_scales), (v, v_scales) = _quantise(k, scale_dtype), _quantise(v, scale_dtype)
    return q, k, v, table, lens, k_scales, v_scales


def _poison_scales(k_scales, v_scales, table, lens, mask, t, page):
    """NaN scales on every page the kernel must not read (``_poison`` picks them)."""
    nan_k, _ = _poison(k_scales[..., None], v_scales[..., None], table, lens, mask, t, page)
    bad = jnp.isnan(nan_k[..., 0])
    return jnp.where(bad, jnp.nan, k_scales), jnp.where(bad, jnp.nan, v_scales)


# name: (lengths, n, kh, page, t, mask, split_k, pages_per_block, q dtype, scales dtype)
CASES = {
    "mha_full_ragged": ([1, 8, 13], 2, 2, 8, 1, None, 1, 1, "float32", "float32"),
    "gqa4_causal_split": ([5, 16, 29], 8, 2, 8, 1, M.Causal(), 3, 2, "float32", "float32"),
    "mqa_local_split": ([3, 40, 17], 4, 1, 8, 1, M.Local(12), 2, 1, "float32", "float32"),
    "gqa4_t3_causal": ([3, 9, 24], 8, 2, 8, 3, M.Causal(), 1, 2, "float32", "float32"),
    "mqa_t3_local_split": ([4, 20, 37], 4, 1, 4, 3, M.Local(6), 2, 2, "float32", "float32"),
    "mha_bf16_scales": ([6, 19], 2, 2, 8, 1, M.Causal(), 2, 1, "float32", "bfloat16"),
    "gqa4_bf16_q_split": ([7, 32, 41], 8, 2, 8, 1, M.Causal(), 2, 2, "bfloat16", "float32"),
    "mqa_bf16_q_bf16_scales_t3": ([3, 24, 39], 4, 1, 8, 3, None, 1, 1, "bfloat16",
                                  "bfloat16"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_matches_reference(case):
    lengths, n, kh, page, t, mask, split_k, ppb, dtype, scale_dtype = CASES[case]
    q, k, v, table, lens, k_scales, v_scales = _quantised_pool(
        lengths, n=n, kh=kh, page=page, t=t, dtype=dtype, scale_dtype=scale_dtype,
        max_pages=-(-max(lengths) // page) + 1)
    want = _reference(q, k, v, table, lens, mask=mask, k_scales=k_scales, v_scales=v_scales)
    k_bad, v_bad = _poison_scales(k_scales, v_scales, table, lens, mask, t, page)
    got = paged_attention(q, k, v, table, lens, mask=mask, split_k=split_k,
                          pages_per_block=ppb, k_scales=k_bad, v_scales=v_bad)
    assert got.dtype == q.dtype and got.shape == q.shape
    _assert_close(got, want, dtype)


def test_same_as_float_kernel_on_dequantised_pages():
    """Folding K's scale into the logits is the float kernel on dequantised pages."""
    q, k, v, table, lens, k_scales, v_scales = _quantised_pool([11, 30], n=4, kh=2)
    kwargs = dict(mask=M.Causal(), split_k=2, pages_per_block=2)
    got = paged_attention(q, k, v, table, lens, k_scales=k_scales, v_scales=v_scales, **kwargs)
    want = paged_attention(q, reference.dequantise_pages(k, k_scales),
                           reference.dequantise_pages(v, v_scales), table, lens, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_out_of_range_page_under_jit_reads_as_empty():
    """Under jit a bad id cannot raise: its page is empty (masked, V zeroed), even though the
    stand-in page the kernel loads in its place has NaN scales; ``checked`` reports it."""
    q, k, v, table, lens, k_scales, v_scales = _quantised_pool([20, 12], n=4, kh=2, page=8)
    spare = min(set(range(k.shape[1])) - set(np.asarray(table).ravel().tolist()))
    table = jnp.where(table == 0, spare, table)                   # page 0: owned by nobody
    table = table.at[0, 1].set(99)                                # slot 1 of sequence 0: bad
    k_scales, v_scales = k_scales.at[:, 0].set(jnp.nan), v_scales.at[:, 0].set(jnp.nan)
    fn = jax.jit(lambda *a: paged_attention.checked(
        *a[:5], k_scales=a[5], v_scales=a[6], mask=M.Causal(), split_k=2, pages_per_block=1))
    err, got = fn(q, k, v, table, lens, k_scales, v_scales)
    assert "block_tables[0, 1]=99" in str(err.get())
    want = _reference(q, k, v, table, lens, mask=M.Causal(), k_scales=k_scales,
                      v_scales=v_scales)
    _assert_close(got, want, "float32")


def _bad(**changes):
    q, k, v, table, lens, k_scales, v_scales = _quantised_pool([5, 12], n=4, kh=2, page=8)
    args = dict(q=q, k_pages=k, v_pages=v, block_tables=table, lengths=lens,
                k_scales=k_scales, v_scales=v_scales)
    args.update(changes)
    return args


K, P, L, H = 2, 6, 8, 32  # the pool _bad builds: 2 + 1 pages used, 3 spare
BAD = {
    "k_scales_alone": (dict(v_scales=None), "k_scales is given but v_scales=None"),
    "v_scales_alone": (dict(k_scales=None), "v_scales is given but k_scales=None"),
    "int8_without_scales": (dict(k_scales=None, v_scales=None), "k_pages.dtype=int8"),
    "float_k_pages": (dict(k_pages=jnp.zeros((K, P, L, H))), "k_pages.dtype=float32"),
    "float_v_pages": (dict(v_pages=jnp.zeros((K, P, L, H), jnp.bfloat16)),
                      "v_pages.dtype=bfloat16"),
    "scales_shape": (dict(k_scales=jnp.ones((K, P, L, 1))), "k_scales.shape=(2, 6, 8, 1)"),
    "scales_pages": (dict(v_scales=jnp.ones((K, P - 1, L))), "v_scales.shape=(2, 5, 8)"),
    "scales_dtype": (dict(k_scales=jnp.ones((K, P, L), jnp.float16)),
                     "k_scales.dtype=float16"),
    "int_q": (dict(q=jnp.zeros((2, 4, H), jnp.int8)), "q.dtype=int8"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_validation_errors(case):
    changes, match = BAD[case]
    args = _bad(**changes)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        paged_attention(**args)


def test_reference_needs_both_scales():
    args = _bad(v_scales=None)
    with pytest.raises(ValueError, match="k_scales and v_scales"):
        reference.paged_attention(**args)
