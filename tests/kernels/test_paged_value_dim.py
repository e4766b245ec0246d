"""The paged decode kernel over latent pages (issue 35, MLA's absorbed decode): no V pages,
the values are the first ``value_dim`` columns of each K page (``[c_kv, k_rope]``), float or
int8 (scaled by ``k_scales``). Against ``kernels.reference.paged_attention`` on the same
pages, with the pages a row must not read poisoned (NaN), and lowered for CUDA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference, score_mods
from tx.kernels.paged_attention import paged_attention
from tests.kernels.test_paged_attention import TOL, _pool, _quantise

R = 16  # value_dim: the latent's width inside the 24-wide key (the rest: the RoPE key)

# name: (N, K, T, mask, modifier, storage, pages_per_block, split_k). One K/V head with every
# query head on it (MLA decode is MQA with a wide head), and K = 2.
CASES = {
    "mqa-t2-int8-ppb2-split2": (4, 1, 2, M.Causal(), None, "int8", 2, 2),
    "k2-bf16-local-sinks": (8, 2, 1, M.Local(9), "sinks", "bfloat16", 1, 1),
}


def _poisoned(k, table, lengths, page):
    """NaN in every page no row reads, and in the slots past each row's length."""
    k = np.array(k, np.float32)
    keep = np.zeros(k.shape[1], bool)
    for row, length in zip(np.asarray(table), np.asarray(lengths)):
        pages = row[:-(-int(length) // page)]
        keep[pages] = True
        last, used = pages[-1], int(length) - (len(pages) - 1) * page
        k[:, last, used:] = np.nan
    k[:, ~keep] = np.nan
    return k


@pytest.mark.parametrize("name", list(CASES))
def test_latent_pages_match_reference(name):
    n, kh, t, mask, mod, storage, ppb, split_k = CASES[name]
    page, dtype = 8, jnp.bfloat16 if storage == "bfloat16" else jnp.float32
    q, k, _, table, lengths = _pool([5, 40, 17], n=n, kh=kh, h=24, page=page, t=t)
    k = _poisoned(k, table, lengths, page)
    scales = {}
    if storage == "int8":
        codes, k_scales = _quantise(np.nan_to_num(k))
        k_scales = jnp.where(jnp.isnan(jnp.asarray(k).max(-1)), jnp.nan, k_scales)
        k, scales = codes, {"k_scales": k_scales}
    else:
        k = jnp.asarray(k, dtype)
    q = q.astype(dtype)
    mod = None if mod is None else score_mods.Sinks(
        jnp.asarray(np.random.default_rng(2).standard_normal(n), jnp.float32))
    got = paged_attention(q, k, None, table, lengths, mask=mask, value_dim=R,
                          pages_per_block=ppb, split_k=split_k, score_mod=mod, **scales)
    assert got.shape == q.shape[:-1] + (R,) and got.dtype == q.dtype
    # The reference over clean pages: poison a kernel read would show as NaN.
    clean = jnp.where(jnp.isnan(k.astype(jnp.float32)), 0, k).astype(k.dtype)
    if storage == "int8":
        scales = {"k_scales": jnp.nan_to_num(scales["k_scales"])}
    want = reference.paged_attention(q.astype(jnp.float32), clean if storage == "int8" else
                                     clean.astype(jnp.float32), None, table, lengths,
                                     mask=mask, value_dim=R, score_mod=mod, **scales)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "a poisoned page or slot was read"
    atol, rtol = TOL["bfloat16" if storage == "bfloat16" else "float32"]
    assert np.abs(got - want).max() <= atol + rtol * np.abs(want).max()


def test_latent_pages_refused():
    q, k, v, table, lengths = _pool([5, 9], h=24, page=8)
    with pytest.raises(ValueError, match=r"value_dim=8 reads the values from the keys"):
        paged_attention(q, k, v, table, lengths, value_dim=8)
    with pytest.raises(ValueError, match=r"value_dim=0 must be an int in \[1, 24\]"):
        paged_attention(q, k, None, table, lengths, value_dim=0)


def test_latent_kernel_lowers_for_cuda():
    """The latent kernel (int8 pages, split-K, one K/V head for 16 query heads) lowers to
    Triton for an NVIDIA target on a CPU-only host."""
    q, k, _, table, lengths = _pool([5, 40, 17], n=16, kh=1, h=64, page=16,
                                    dtype=jnp.bfloat16)
    codes, k_scales = _quantise(k)
    fn = jax.jit(lambda q, k, s, table, lengths: paged_attention(
        q, k, None, table, lengths, mask=M.Causal(), value_dim=48, k_scales=s, split_k=2,
        interpret=False))
    text = fn.trace(q, codes, k_scales, table, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
