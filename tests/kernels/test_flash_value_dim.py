"""The flash kernel with values of their own head dim (``v [B, S, K, Hv]``, ``Hv != H``: MLA's
expanded form, 192-wide q/k and 128-wide v in DeepSeek-V3), forward and backward against
``kernels.reference.attention``, and its lowering for CUDA. Each case combines several
features in one compile (the interpreter is slow); the conformance suite
(``tx.testing.UNEQUAL_HEAD_DIMS``) adds more masks and modifiers through every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference, score_mods
from tx.kernels.flash_attention import flash_attention
from tests.kernels.test_flash_attention import SMALL, TOL, _assert_close


def _inputs(b, t, s, n, kh, h, hv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((b, t, n, h), (b, s, kh, h), (b, s, kh, hv), (b, t, n, hv))
    return tuple(jnp.asarray(rng.standard_normal(x), dtype) for x in shapes)


@functools.partial(jax.jit, static_argnums=(0,))
def _vjp(fn, q, k, v, do, mod, data):
    out, pull = jax.vjp(lambda q, k, v, mod: fn(q, k, v, score_mod=mod, **data), q, k, v, mod)
    return (out, *pull(do))


# (H, Hv, N, K, mask, modifier, dtype): Hv below and above H, padded to other tile widths
# (24 -> 32 vs 16; 8 -> 16 vs 40 -> 64); G = 2, and G = 3 (programs sharing a K/V head sum
# their dk/dv); ragged T and S past one tile.
CASES = {
    "h24v16-g2-causal-packed-empty_row": (24, 16, 4, 2, M.Causal(), None, "float32"),
    "h8v40-g3-local-sinks-bf16": (8, 40, 3, 1, M.Local(9), "sinks", "bfloat16"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flash_matches_reference(name):
    h, hv, n, kh, mask, mod, dtype = CASES[name]
    b, t, s = 2, 37, 45
    q, k, v, do = _inputs(b, t, s, n, kh, h, hv, jnp.dtype(dtype))
    rng = np.random.default_rng(1)
    kv_seg = np.cumsum(rng.random((b, s)) < 0.08, axis=1).astype(np.int32)
    data = {"segment_ids": (jnp.asarray(kv_seg[:, s - t:]), jnp.asarray(kv_seg)),
            "kv_lengths": jnp.asarray([s - 3, 0], jnp.int32)}  # row 1 sees nothing
    mod = None if mod is None else score_mods.Sinks(jnp.asarray(rng.standard_normal(n),
                                                                jnp.float32))
    kernel = functools.partial(flash_attention, mask=mask, block_sizes=SMALL)
    ref = functools.partial(reference.attention, mask=mask)
    got = _vjp(kernel, q, k, v, do, mod, data)
    f32 = lambda x: jax.tree.map(lambda a: a.astype(jnp.float32), x)  # noqa: E731
    want = _vjp(ref, *f32((q, k, v, do)), mod, data)
    assert got[0].shape == (b, t, n, hv) and got[0].dtype == q.dtype
    assert got[3].shape == v.shape and got[3].dtype == v.dtype
    tol = TOL[dtype]
    for i, label in enumerate(("out", "dq", "dk", "dv")):
        _assert_close(label, got[i], want[i], tol["fwd" if i == 0 else "grad"])
    if mod is not None:
        _assert_close("d sinks", got[4].logits, want[4].logits, tol["grad"])
    # The row without keys: zero output and zero dq.
    assert not np.asarray(got[0][1], np.float32).any()
    assert not np.asarray(got[1][1], np.float32).any()


def test_value_head_dim_refused_past_the_limit():
    q, k, _, _ = _inputs(1, 16, 16, 2, 2, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"head_dim=320 \(v.shape\[3\]\)"):
        flash_attention(q, k, jnp.zeros((1, 16, 2, 320), jnp.float32))
    with pytest.raises(ValueError, match=r"must agree in \[B, S, K\]"):
        flash_attention(q, k, jnp.zeros((1, 15, 2, 8), jnp.float32))


def test_lowers_for_cuda():
    """DeepSeek-V3's head dims (192 for q/k, 128 for v), forward and backward, lower to
    Triton for an NVIDIA target on a CPU-only host."""
    q, k, v, do = _inputs(1, 64, 64, 4, 4, 192, 128, jnp.bfloat16)
    fn = functools.partial(flash_attention, mask=M.Causal(), interpret=False)
    traced = _vjp.trace(fn, q, k, v, do, None, {})
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3  # forward, dq and dk/dv kernels
