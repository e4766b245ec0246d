"""kernels.linear_attention (Pallas) and linear_attention_chunked (lax.scan) against
kernels.reference.linear_attention (quadratic): outputs and q_f/k_f/v gradients.

The kernel runs with ``interpret=None``: the Pallas interpreter on CPU, the compiled Triton
kernels on a GPU. Every interpret-mode configuration costs a compile (~1 s on CPU), so the chunk
sweep covers each (T, chunk) pair once and cycles the head layouts and data over it rather than
taking their full product. Both forms through the ``pallas`` and ``xla`` backends (chunks of 8,
causal and bidirectional, GQA, bf16, packed documents, key lengths) are the conformance
suite's (``tx.testing``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import reference
from tx.kernels.linear_attention import linear_attention, linear_attention_chunked

# (atol, rtol) per dtype; an error must satisfy max|x - ref| <= atol + rtol * max|ref|.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 1e-2), "float16": (2e-3, 2e-3)}
NAMES = ("out", "dq", "dk", "dv")


def _inputs(b, t, n, kh, f, h, dtype, seed=0):
    """Non-negative features (as a positive random feature map gives), normal values."""
    rng = np.random.default_rng(seed)
    q = rng.random((b, t, n, f), np.float32)
    k = rng.random((b, t, kh, f), np.float32)
    v = rng.standard_normal((b, t, kh, h), np.float32)
    do = rng.standard_normal((b, t, n, h), np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, do))


def _documents(b, t, seed=1, p=0.15):
    """Random packed documents: contiguous runs, ids increase at random boundaries."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.cumsum(rng.random((b, t)) < p, axis=1).astype(np.int32))


# The shapes are tiny and every configuration compiles once, so compiling is nearly all of
# this file's time: on CPU, compile without LLVM's optimisation passes (about half the time;
# the arithmetic is the same).
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0} \
    if jax.default_backend() == "cpu" else {}


def _compile_and_run(fn, *args):
    return jax.jit(fn).trace(*args).lower().compile(_COMPILER_OPTIONS)(*args)


def _vjp(fn, q, k, v, do, data):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **data), q, k, v)
    return (out, *vjp(do))


def _value_and_grads(fn, q, k, v, do, **data):
    """``fn``'s output and its q, k, v gradients for the output gradient ``do``."""
    return _compile_and_run(functools.partial(_vjp, fn), q, k, v, do, data)


def _reference(q, k, v, do, eps=0.0, **data):
    """Reference output and grads in fp32 on the same (rounded) values: the error is the
    kernel's."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    return _value_and_grads(functools.partial(reference.linear_attention, eps=eps), *f32,
                            **data)


def _assert_close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    atol, rtol = tol
    err, bound = np.abs(got - want).max(), atol + rtol * np.abs(want).max()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _empty_rows_data(t):
    """Three rows: in row 0 only keys 0..2 exist (length 3), so its second document
    (positions 6..) sees nothing, and position 1 has a zero query (visible keys, zero
    denominator); row 1 has no keys at all; row 2 is ordinary packed data."""
    seg = np.zeros((3, t), np.int32)
    seg[0, 6:] = 1
    seg[2] = np.asarray(_documents(1, t, seed=9))[0]
    return {"segment_ids": jnp.asarray(seg), "kv_lengths": jnp.asarray([3, 0, t], jnp.int32)}


def _compare(*, b=2, t=32, n=2, kh=2, f=8, h=16, chunk=8, dtype=jnp.float32,
             data="plain", kv_lengths=None, eps=0.0, chunked=True, seed=0):
    """Kernel (and chunked jnp form) against the reference: out, dq, dk, dv. ``data`` is
    "plain", "packed" (random documents) or "empty" (``_empty_rows_data``, three rows)."""
    if data == "empty":
        b = 3
    q, k, v, do = _inputs(b, t, n, kh, f, h, dtype, seed)
    extra = {}
    if data == "packed":
        extra["segment_ids"] = _documents(b, t, seed + 1)
    if kv_lengths is not None:
        extra["kv_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
    if data == "empty":
        extra = _empty_rows_data(t)
        q = q.at[0, 1].set(0)
    want = _reference(q, k, v, do, eps=eps, **extra)
    tol = TOL[jnp.dtype(dtype).name]
    fns = {"kernel": functools.partial(linear_attention, chunk=chunk, eps=eps)}
    if chunked:
        fns["chunked"] = functools.partial(linear_attention_chunked, chunk=chunk, eps=eps)
    results = {}
    for impl, fn in fns.items():
        got = _value_and_grads(fn, q, k, v, do, **extra)
        assert got[0].dtype == dtype and got[0].shape == (b, t, n, h), impl
        for name, g, w in zip(NAMES, got, want):
            _assert_close(f"{impl} {name}", g, w, tol)
        results[impl] = got
    return results


def _assert_empty_rows_are_zero(out, dq, dk, dv):
    """Rows that see no key (or have a zero denominator): exact zeros, zero grads."""
    for x in (out, dq):
        x = np.asarray(x)
        assert not x[0, 6:].any() and not x[1].any() and not x[0, 1].any()
        assert x[0, 0].any() and x[2].any()
    for x in (dk, dv):           # keys past the length get nothing
        x = np.asarray(x)
        assert not x[0, 3:].any() and not x[1].any() and x[2].any()


# --- the chunk sweep: every chunk size at T=13 and T=32 (chunks that do not divide T) ---------

@pytest.mark.parametrize("t,chunk,n,kh,data,kv_lengths,eps", [
    (13, 1, 2, 2, "plain", None, 0.0),          # MHA, one token per chunk
    (13, 3, 8, 2, "packed", None, 0.0),         # GQA 4:1
    (13, 8, 4, 1, "packed", [20, 6], 0.0),      # MQA, a length past T
    (13, 16, 6, 2, "plain", [9, 13], 0.0),      # G = 3 (not a power of two), chunk > T
    (32, 1, 8, 2, "packed", None, 0.0),         # GQA 4:1, one token per chunk
    (32, 3, 4, 1, "plain", None, 1e-3),         # MQA, eps
    (32, 8, 2, 2, "empty", None, 0.0),          # MHA, rows that see nothing
    (32, 16, 8, 2, "packed", [25, 32], 0.0),    # GQA 4:1, lengths
], ids=lambda x: str(x))
def test_matches_reference(t, chunk, n, kh, data, kv_lengths, eps):
    got = _compare(t=t, chunk=chunk, n=n, kh=kh, data=data, kv_lengths=kv_lengths, eps=eps)
    if data == "empty":
        for impl in ("kernel", "chunked"):
            _assert_empty_rows_are_zero(*got[impl])


def test_bfloat16():
    """GQA 4:1 with ragged chunks of 3 (the conformance suite's bf16 cases take chunks of 8
    through the ``pallas`` and ``xla`` backends)."""
    _compare(t=32, chunk=3, n=8, kh=2, f=16, h=32, dtype=jnp.bfloat16, data="packed",
             kv_lengths=[32, 27], chunked=False)


def test_float16_default_chunk():
    """fp16 with the default chunk (64 in interpret mode: two chunks, the second ragged)."""
    _compare(t=70, chunk=None, n=4, kh=1, f=16, h=32, dtype=jnp.float16, data="packed",
             chunked=False)


# --- packing: documents do not see each other ----------------------------------------------

def test_packed_documents_match_documents_alone():
    """A packed row [doc0 (5), doc1 (11), doc2 (16)] gives each document the outputs and
    gradients it has alone; chunk 3 makes chunks straddle the document boundaries. The
    documents alone are three more rows of the same batch, each at the start of its row and
    zero padded (causal: the padding is invisible to the document; its output gradient is 0).
    """
    n, kh, f, h, t = 4, 2, 8, 16, 32
    lengths = (5, 11, 16)
    starts = np.cumsum((0,) + lengths)
    packed = _inputs(1, t, n, kh, f, h, jnp.float32, seed=3)

    def batch(x):  # [1, T, ...] -> [4, T, ...]: the packed row, then each document alone
        docs = [x[0, a:a + m] for a, m in zip(starts, lengths)]
        return jnp.stack([x[0]] + [jnp.pad(d, ((0, t - m),) + ((0, 0),) * (d.ndim - 1))
                                   for d, m in zip(docs, lengths)])
    seg = np.zeros((4, t), np.int32)
    seg[0] = np.repeat([5, 6, 9], lengths)
    got = _value_and_grads(functools.partial(linear_attention, chunk=3),
                           *(batch(x) for x in packed), segment_ids=jnp.asarray(seg))
    for name, x in zip(NAMES, got):
        alone = jnp.concatenate([x[1 + i, :m] for i, m in enumerate(lengths)])
        _assert_close(name, x[0], alone, TOL["float32"])


# --- the reference itself, against a loop over rows ------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_reference_against_loop(causal):
    b, t, n, kh, f, h = 2, 9, 4, 2, 5, 3
    q, k, v, _ = (np.asarray(x) for x in _inputs(b, t, n, kh, f, h, jnp.float32, seed=5))
    seg = np.asarray(_documents(b, t, seed=6, p=0.3))
    lengths = np.asarray([9, 5], np.int32)
    want = np.zeros((b, t, n, h), np.float32)
    for i in range(b):
        for tt in range(t):
            for j in range(n):
                keys = [s for s in range(t) if (s <= tt or not causal)
                        and seg[i, s] == seg[i, tt] and s < lengths[i]]
                w = np.array([q[i, tt, j] @ k[i, s, j // (n // kh)] for s in keys])
                if keys and w.sum() != 0:
                    want[i, tt, j] = (w[:, None] * v[i, keys, j // (n // kh)]).sum(0) / w.sum()
    got = reference.linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     segment_ids=jnp.asarray(seg),
                                     kv_lengths=jnp.asarray(lengths), causal=causal)
    _assert_close("out", got, want, TOL["float32"])


# --- the kernels lower for CUDA through Triton on a CPU-only host ---------------------------

@pytest.mark.parametrize("dtype,n,kh,segments,chunk", [
    (jnp.float32, 8, 2, True, 3),       # GQA 4:1, packed; chunk rounded up to a Triton tile
    (jnp.bfloat16, 6, 2, True, None),   # G = 3, default chunk
    (jnp.bfloat16, 4, 1, False, 32),    # MQA, no segments
], ids=["f32-gqa-seg", "bf16-g3-seg", "bf16-mqa"])
def test_kernels_lower_through_triton(dtype, n, kh, segments, chunk):
    b, t = 2, 40
    q, k, v, do = _inputs(b, t, n, kh, 24, 64, dtype)
    data = {"kv_lengths": jnp.asarray([40, 9], jnp.int32)}
    if segments:
        data["segment_ids"] = _documents(b, t)
    fn = functools.partial(linear_attention, chunk=chunk, interpret=False)
    lowered = jax.jit(functools.partial(_vjp, fn)).trace(q, k, v, do, data)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3  # forward, dq and dk/dv kernels


# --- validation: every bad argument is a ValueError naming it --------------------------------

def _qkv(t=16, n=4, kh=2, f=8, h=16, dtype=jnp.float32):
    return _inputs(1, t, n, kh, f, h, dtype)[:3]


@pytest.mark.parametrize("kwargs,match", [
    ({"chunk": 0}, "chunk=0 must be >= 1"),
    ({"chunk": -3}, "chunk=-3 must be >= 1"),
    ({"chunk": 2.5}, "chunk=2.5"),
    ({"chunk": True}, "chunk=True"),
    ({"eps": -1.0}, "eps=-1.0"),
    ({"eps": float("nan")}, "eps=nan"),
    ({"segment_ids": jnp.zeros((1, 15), jnp.int32)}, "segment_ids.shape=(1, 15)"),
    ({"segment_ids": jnp.zeros((1, 16))}, "segment_ids.dtype=float32"),
    ({"segment_ids": (jnp.zeros((1, 16), jnp.int32),) * 2}, "segment_ids.shape=None"),
    ({"kv_lengths": jnp.zeros((2,), jnp.int32)}, "kv_lengths.shape=(2,)"),
    ({"kv_lengths": jnp.zeros((1,))}, "kv_lengths.dtype=float32"),
    ({"interpret": "yes"}, "interpret='yes'"),
], ids=lambda x: str(x)[:40])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        linear_attention(*_qkv(), **kwargs)


def test_bad_shapes_and_dtypes():
    q, k, v = _qkv()
    cases = [
        ((q[0], k, v), "q_f.shape=(16, 4, 8) must be 4-D"),
        ((q, k[:, :15], v[:, :15]), "k_f.shape[1]=15 must equal q_f.shape[1]=16"),
        ((q, k, v[:, :, :1]), "v.shape=(1, 16, 1, 16)"),
        ((q, k[..., :4], v), "features k_f.shape[3]=4"),
        ((q, *_qkv(n=3, kh=3)[1:]), "num_heads=4"),
        ((q, k.astype(jnp.bfloat16), v), "dtypes must match"),
        (tuple(x.astype(jnp.int32) for x in (q, k, v)), "v.dtype=int32"),
        (_qkv(f=300), "features=300"),
        (_qkv(h=300), "head_dim=300"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            linear_attention(*args)
    with pytest.raises(ValueError, match="chunk=None"):
        linear_attention_chunked(q, k, v, chunk=None)
    with pytest.raises(ValueError, match=r"chunk=0 must be >= 1"):
        linear_attention_chunked(q, k, v, chunk=0)
    with pytest.raises(ValueError, match=r"pass a pair"):
        reference.linear_attention(q, k[:, :8], v[:, :8], causal=False,
                                   segment_ids=jnp.zeros((1, 16), jnp.int32))
