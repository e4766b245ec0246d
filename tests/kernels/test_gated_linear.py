"""Gated linear recurrences: the Pallas kernel (``kernels.gated_linear``) and the jnp chunked
form (``kernels.gated_chunked``) against the step-by-step recurrence
(``kernels.gated_reference``), outputs and q/k/v/log-decay gradients; the delta rule's chunked
(WY) form (``kernels.delta_rule``) against its recurrence.

Every interpret-mode kernel configuration costs a compile (~2 s on CPU), so the kernel sweep
covers a few configurations that each combine several options (GQA, packing, key lengths,
chunks not dividing T, per-channel decays, bf16) instead of their product; the jnp forms,
cheaper to compile, take the wider sweep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels.delta_kernel import delta_rule_attention
from tx.kernels.delta_rule import delta_chunked
from tx.kernels.gated_chunked import gated_chunked
from tx.kernels.gated_linear import gated_linear_attention
from tx.kernels.gated_reference import delta_recurrence, gated_recurrence

# (atol, rtol): max|x - ref| <= atol + rtol * max|ref|.
TOL = {"float32": (1e-5, 2e-5), "bfloat16": (2e-2, 2e-2)}
NAMES = ("out", "dq", "dk", "dv", "dg")
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0} \
    if jax.default_backend() == "cpu" else {}


def _inputs(b, t, n, kh, dk, dv, decay, seed=0):
    """Normal q/k/v/do; ``decay``: 'mid' (a in (0.37, 1)), 'one' (a within 1e-4 of 1), 'zero'
    (a < 1e-8), 'mixed' (each position one of those)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((b, t, n, dk)), rng.standard_normal((b, t, kh, dk)) / dk ** 0.5
    v, do = rng.standard_normal((b, t, kh, dv)), rng.standard_normal((b, t, n, dv))
    shape = (b, t, kh, dk) if decay.endswith("channel") else (b, t, kh)
    u = rng.random(shape)
    mixed = np.choose(rng.integers(0, 3, shape), [-u, -1e-4 * u, -20.0 - u])
    g = {"mid": -u, "mid-channel": -u, "one": -1e-4 * u, "zero": -20.0 - u, "mixed": mixed,
         "mixed-channel": mixed}
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g[decay], do))


def _documents(b, t, seed=1, p=0.15):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.cumsum(rng.random((b, t)) < p, axis=1).astype(np.int32))


def _vjp(fn, q, k, v, g, do, data):
    out, vjp = jax.vjp(lambda q, k, v, g: fn(q, k, v, g, **data), q, k, v, g)
    return (out, *vjp(do))


def _run(fn, *args, data):
    f = functools.partial(_vjp, fn)
    return jax.jit(f).trace(*args, data).lower().compile(_COMPILER_OPTIONS)(*args, data)


def _assert_close(got, want, tol):
    atol, rtol = tol
    for name, x, y in zip(NAMES, got, want):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert np.isfinite(x).all(), name
        err, bound = np.abs(x - y).max(), atol + rtol * np.abs(y).max()
        assert err <= bound, f"{name}: max|diff|={err:.3g} > {bound:.3g}"


def _data(b, t, segments, lengths):
    data = {}
    if segments:
        data["segment_ids"] = _documents(b, t)
    if lengths:
        # The last row sees no key at all: zeros out, zeros back.
        data["kv_lengths"] = jnp.asarray([t, t // 2 + 1, 0][:b], jnp.int32)
    return data


@functools.cache
def _reference(b, t, n, kh, dk, dv, decay, segments, lengths, dtype):
    args = _inputs(b, t, n, kh, dk, dv, decay)
    # bf16 cases: the reference sees the same rounded inputs, computes in fp32.
    args = tuple(x.astype(dtype).astype(jnp.float32) for x in args)
    return args, _run(gated_recurrence, *args, data=_data(b, t, segments, lengths))


# --- the jnp chunked form: wide sweep ---------------------------------------------------------

# Each case one chunk size (a compile each): 5 and 8 do not divide T = 23, 64 is longer.
@pytest.mark.parametrize("decay,segments,lengths,n,kh,chunk", [
    ("mid", False, False, 2, 2, 1), ("one", True, False, 4, 2, 5),
    ("zero", False, True, 3, 1, 8), ("mixed", True, True, 4, 2, 8),
    ("mid-channel", True, False, 2, 2, 64), ("mixed-channel", True, True, 4, 1, 5)],
    ids=["mid-mha", "one-gqa-packed", "zero-mqa-lengths", "mixed-packed-lengths",
         "channel-packed", "channel-mixed-mqa-packed-lengths"])
def test_chunked_matches_step(decay, segments, lengths, n, kh, chunk):
    b, t = 3, 23
    args, want = _reference(b, t, n, kh, 8, 8, decay, segments, lengths, "float32")
    got = _run(functools.partial(gated_chunked, chunk=chunk), *args,
               data=_data(b, t, segments, lengths))
    _assert_close(got, want, TOL["float32"])
    if lengths:
        _assert_empty_row_is_zero(got)


def test_chunked_resumes_from_its_state():
    """Two calls, the second from the first's final state, equal one call (decoding state)."""
    q, k, v, g, _ = _inputs(2, 30, 4, 2, 8, 8, "mid-channel")
    run = jax.jit(gated_chunked, static_argnames=("chunk", "final_state"))
    whole, s_whole = run(q, k, v, g, chunk=8, final_state=True)
    o1, s1 = run(q[:, :13], k[:, :13], v[:, :13], g[:, :13], chunk=4, final_state=True)
    o2, s2 = run(q[:, 13:], k[:, 13:], v[:, 13:], g[:, 13:], chunk=5, initial_state=s1,
                 final_state=True)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), whole, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s2, s_whole, atol=2e-5, rtol=2e-5)


# --- the Pallas kernel (interpret mode on CPU): a few combined configurations ------------------

@pytest.mark.parametrize("dtype,decay,segments,lengths,n,kh,t,chunk", [
    # GQA, packed, key lengths (one row empty), decays near 0, 1 and between, 8 does not
    # divide 23 (the references are the chunked form's)
    ("float32", "mixed", True, True, 4, 2, 23, 8),
    ("float32", "mixed-channel", True, True, 4, 1, 23, 5),     # per-channel, MQA
    ("bfloat16", "mid-channel", False, True, 4, 2, 24, None),  # bf16, default chunk (16)
], ids=["f32-gqa-packed-lengths", "f32-channel-mqa-packed", "bf16-channel-lengths"])
def test_kernel_matches_step(dtype, decay, segments, lengths, n, kh, t, chunk):
    b = 3
    args, want = _reference(b, t, n, kh, 8, 8, decay, segments, lengths, dtype)
    q, k, v, g, do = args
    cast = tuple(x.astype(dtype) for x in (q, k, v, do))
    fn = functools.partial(gated_linear_attention, chunk=chunk)
    got = _run(fn, *cast[:3], g, cast[3], data=_data(b, t, segments, lengths))
    assert got[0].dtype == jnp.dtype(dtype)
    _assert_close(got, want, TOL[dtype])
    if lengths:
        _assert_empty_row_is_zero(got)


def _assert_empty_row_is_zero(got):
    """The row with no visible key (kv_lengths 0) outputs zeros and passes back zeros."""
    for name, x in zip(NAMES, got):
        if name != "dq":  # its queries still see no key: dq is zero too
            assert np.any(np.asarray(x)[0] != 0), name
        assert np.all(np.asarray(x)[2] == 0), name


# --- the kernels lower for CUDA through Triton on a CPU-only host -----------------------------

def _export_cuda(fn, *args):
    from jax import export
    check = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[check])(*args)


@pytest.mark.parametrize("dtype,decay", [("float32", "mid"), ("bfloat16", "mid-channel")])
def test_kernels_export_for_cuda(dtype, decay):
    """Forward, dq and dk/dv kernels (value and gradients), GQA, packed, lengths, chunk 3
    (rounded up to a Triton tile)."""
    b, t = 2, 40
    q, k, v, g, do = _inputs(b, t, 4, 2, 24, 64, decay)
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    data = _data(b, t, True, True)
    fn = functools.partial(gated_linear_attention, chunk=3, interpret=False)
    exported = _export_cuda(functools.partial(_vjp, fn), q, k, v, g, do, data)
    assert exported.mlir_module().count("triton") >= 3


# --- validation: every bad argument is a ValueError naming it ---------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"chunk": 0}, "chunk=0 must be >= 1"),
    ({"chunk": 2.5}, "chunk=2.5"),
    ({"log_decay": jnp.full((1, 16, 2), 0.5)}, "log_decay has max=0.5"),
    ({"log_decay": jnp.full((1, 16, 2), jnp.nan)}, "log_decay has max=nan"),
    ({"log_decay": jnp.zeros((1, 16, 4))}, r"log_decay.shape=\(1, 16, 4\)"),
    ({"log_decay": jnp.zeros((1, 16, 2), jnp.int32)}, "log_decay.dtype=int32"),
    ({"segment_ids": jnp.zeros((1, 15), jnp.int32)}, r"segment_ids.shape=\(1, 15\)"),
    ({"kv_lengths": jnp.zeros((1,))}, "kv_lengths.dtype=float32"),
    ({"interpret": "yes"}, "interpret='yes'"),
], ids=lambda x: str(x)[:30])
def test_bad_arguments(kwargs, match):
    q, k, v, g, _ = _inputs(1, 16, 4, 2, 8, 8, "mid")
    kwargs = {"log_decay": g, **kwargs}
    with pytest.raises(ValueError, match=match):
        gated_linear_attention(q, k, v, **kwargs)
    if "interpret" not in kwargs:
        with pytest.raises(ValueError, match=match):
            gated_chunked(q, k, v, **{"chunk": 8, **kwargs})


def test_bad_head_layout():
    q, k, v, g, _ = _inputs(1, 16, 3, 2, 8, 8, "mid")
    with pytest.raises(ValueError, match="num_heads=3"):
        gated_linear_attention(q, k, v, g)


# --- the delta rule: chunked (WY) form against the step recurrence ----------------------------

def _delta_inputs(b, t, n, kh, dk, dv, decay, seed=3):
    q, k, v, g, do = _inputs(b, t, n, kh, dk, dv, decay, seed)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # the delta rule's normalised keys
    beta = jnp.asarray(np.random.default_rng(seed).random((b, t, kh)), jnp.float32)
    return q, k, v, g, beta, do


@pytest.mark.parametrize("decay,segments,lengths,n,kh", [
    ("one", True, False, 4, 2), ("zero", False, True, 3, 1), ("mixed", True, True, 4, 1)],
    ids=["one-gqa-packed", "zero-mqa-lengths", "mixed-packed-lengths"])
def test_delta_chunked_matches_step(decay, segments, lengths, n, kh):
    b, t = 3, 23
    q, k, v, g, beta, do = _delta_inputs(b, t, n, kh, 8, 8, decay)
    data = _data(b, t, segments, lengths)

    def vjp(fn):
        out, f = jax.vjp(lambda q, k, v, g, beta: fn(q, k, v, g, beta, **data), q, k, v, g,
                         beta)
        return (out, *f(do))

    want = jax.jit(lambda: vjp(delta_recurrence))()
    chunk = len(decay) + 1  # one compile per case: 4, 5 and 6 do not divide 23
    got = jax.jit(lambda: vjp(functools.partial(delta_chunked, chunk=chunk)))()
    for name, x, y in zip(("out", "dq", "dk", "dv", "dg", "dbeta"), got, want):
        err, bound = np.abs(x - y).max(), 1e-5 + 5e-5 * np.abs(y).max()
        assert err <= bound, f"{name} chunk={chunk}: {err:.3g} > {bound:.3g}"


def test_delta_chunked_resumes_from_its_state():
    q, k, v, g, beta, _ = _delta_inputs(1, 30, 2, 2, 8, 8, "mid")
    run = jax.jit(delta_chunked, static_argnames=("chunk", "final_state"))
    whole, s_whole = run(q, k, v, g, beta, chunk=8, final_state=True)
    parts = [x[:, :13] for x in (q, k, v, g, beta)], [x[:, 13:] for x in (q, k, v, g, beta)]
    o1, s1 = run(*parts[0], chunk=4, final_state=True)
    o2, s2 = run(*parts[1], chunk=5, initial_state=s1, final_state=True)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), whole, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s2, s_whole, atol=2e-5, rtol=2e-5)


def test_delta_bad_arguments():
    q, k, v, g, beta, _ = _delta_inputs(1, 16, 2, 2, 8, 8, "mid")
    with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
        delta_chunked(q, k, v, g, beta, chunk=0)
    with pytest.raises(ValueError, match=r"beta.shape=\(1, 16\)"):
        delta_chunked(q, k, v, g, beta[..., 0], chunk=4)
    with pytest.raises(ValueError, match=r"log_decay.shape=\(1, 16, 2, 8\)"):
        delta_chunked(q, k, v, jnp.zeros((1, 16, 2, 8)), beta, chunk=4)


def test_delta_kernel_matches_step():
    """The Pallas forward (gradients through the chunked form): GQA, packed, key lengths with
    an empty row, bf16 inputs, chunk 5."""
    b, t = 3, 23
    q, k, v, g, beta, do = _delta_inputs(b, t, 4, 2, 8, 8, "mixed")
    q, k, v, do = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v, do))
    data = _data(b, t, True, True)

    def vjp(fn, *args):
        out, f = jax.vjp(lambda q, k, v, g, beta: fn(q, k, v, g, beta, **data), *args)
        return (out, *f(do.astype(out.dtype)))

    want = jax.jit(lambda: vjp(delta_recurrence, q, k, v, g, beta))()
    cast = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    fn = functools.partial(delta_rule_attention, chunk=5)
    got = jax.jit(lambda: vjp(fn, *cast, g, beta))()
    assert got[0].dtype == jnp.bfloat16
    _assert_close(got, want, TOL["bfloat16"])
    _assert_empty_row_is_zero(got)


def test_delta_kernel_exports_for_cuda():
    q, k, v, g, beta, do = _delta_inputs(2, 40, 4, 2, 24, 64, "mid")
    data = _data(2, 40, True, True)
    fn = functools.partial(delta_rule_attention, chunk=3, interpret=False)

    def run(q, k, v, g, beta, do):
        out, f = jax.vjp(lambda *a: fn(*a, **data), q, k, v, g, beta)
        return (out, *f(do))

    assert _export_cuda(run, q, k, v, g, beta, do).mlir_module().count("triton") >= 1
