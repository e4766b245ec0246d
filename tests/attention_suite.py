"""One conformance suite for every attention implementation.

An implementation is a name in the attention registry (``tx.attention.registry``) or a callable
with the signature of ``kernels.reference.attention``. To hold one to the suite, subclass
``AttentionSuite`` in a ``Test*`` class and set ``implementation``; pytest then runs every test
below on it, against ``kernels.reference.attention`` run in fp32 on the same (rounded) inputs,
so the error measured is the implementation's.

Every test draws its masks from the one ``CATALOGUE`` (every mask kind in ``kernels.masks`` and
both compositions). Lengths are deliberately not tile multiples. Tests run under strict dtype
promotion (``jax.numpy_dtype_promotion("strict")``, as Equinox's tests do), so a silent
float32/bfloat16 mix inside an implementation is an error here.

An implementation declines a case it cannot serve by raising ``NotImplementedError`` (as the
registry expects); the test is then skipped with its reason, unless the implementation is one
that must serve every core case (``must_serve_core``), where declining fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from typing import Callable, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import masks
from kernels import reference

CATALOGUE: dict[str, masks.Mask] = {
    "full": masks.Full(),
    "causal": masks.Causal(),
    "local": masks.Local(3),                                   # causal window of 4 keys
    "local_two_sided": masks.Local(2, 3),
    "strided": masks.Strided(3),
    "bigbird": masks.BigBird(4, seed=1),                       # blocks of 4, one random block
    "global": masks.GlobalTokens((0, 6)),                      # alone: global rows and columns
    "local_or_global": masks.Local(2, 2) | masks.GlobalTokens((0,)),
    "strided_and_local": masks.Strided(3) & masks.Local(7),    # no band: exact tile maps
}
MASKS = list(CATALOGUE)

# (atol, rtol) per dtype: an error must satisfy max|got - want| <= atol + rtol * max|want|.
TOLERANCE = {
    "float32": {"out": (1e-5, 1e-5), "grad": (1e-5, 1e-5)},
    "bfloat16": {"out": (2e-2, 2e-2), "grad": (2e-2, 2e-2)},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call: shapes ``[B, T, N, H]`` / ``[B, S, K, H]``, a catalogue mask and the data.

    ``segments``: ``None``; ``"packed"``, random documents with queries taking the document of
    their (bottom-right aligned) position; or ``"orphan"``, one document of queries that no key
    belongs to. Cases without ``bias`` are core: ``xla`` and ``pallas`` serve all of them.
    """

    mask: str
    t: int = 13
    s: int = 13
    n: int = 4
    kh: int = 2
    b: int = 2
    h: int = 8
    dtype: str = "float32"
    segments: str | None = None
    kv_lengths: tuple[int, ...] | None = None
    bias: bool = False

    @property
    def core(self) -> bool:
        return not self.bias

    @property
    def mask_value(self) -> masks.Mask:
        return CATALOGUE[self.mask]

    def segment_ids(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.segments is None:
            return None
        if self.segments == "orphan":
            q_seg = np.zeros((self.b, self.t), np.int32)
            q_seg[0, 3:6] = 9  # a document with queries and no keys
            kv_seg = np.zeros((self.b, self.s), np.int32)
            return q_seg, kv_seg
        assert self.segments == "packed" and self.t <= self.s, self
        rng = np.random.default_rng(7)
        kv_seg = np.cumsum(rng.random((self.b, self.s)) < 0.3, axis=1).astype(np.int32)
        return kv_seg[:, self.s - self.t:], kv_seg

    def visible(self) -> np.ndarray:
        """``[B, T, S]`` bool from the dense mask and the data, with numpy only."""
        vis = np.broadcast_to(self.mask_value.dense(self.t, self.s), (self.b, self.t, self.s))
        seg = self.segment_ids()
        if seg is not None:
            vis = vis & (seg[0][:, :, None] == seg[1][:, None, :])
        if self.kv_lengths is not None:
            vis = vis & (np.arange(self.s)[None, None, :] <
                         np.asarray(self.kv_lengths)[:, None, None])
        return vis

    @functools.cache
    def arrays(self):
        """``(q, k, v, do, data)``: inputs and output cotangent in ``dtype``, and the keyword
        arrays (segment ids, key lengths, bias) the case passes."""
        rng = np.random.default_rng(zlib.crc32(repr(self).encode()))
        shapes = ((self.b, self.t, self.n, self.h), (self.b, self.s, self.kh, self.h),
                  (self.b, self.s, self.kh, self.h), (self.b, self.t, self.n, self.h))
        q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), self.dtype)
                       for shape in shapes)
        data = {}
        seg = self.segment_ids()
        if seg is not None:
            data["segment_ids"] = (jnp.asarray(seg[0]), jnp.asarray(seg[1]))
        if self.kv_lengths is not None:
            data["kv_lengths"] = jnp.asarray(self.kv_lengths, jnp.int32)
        if self.bias:
            data["bias"] = jnp.asarray(
                rng.standard_normal((1, self.n, self.t, self.s), np.float32))
        return q, k, v, do, data


# --- running implementations: one compiled function per (implementation, mask, shapes) ---------

def _forward(fn, q, k, v, data, *, mask):
    return fn(q, k, v, mask=mask, **data)


def _value_and_grads(fn, q, k, v, do, data, *, mask):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask, **data), q, k, v)
    return (out, *vjp(do))


_JIT = {f: jax.jit(f, static_argnums=(0,), static_argnames=("mask",))
        for f in (_forward, _value_and_grads)}


@functools.cache
def resolve(implementation: str | Callable) -> Callable:
    """A callable for a registry name (the same object each time, so compiles are shared)."""
    if callable(implementation):
        return implementation
    from tx.attention import registry  # names live in the library's registry

    def by_name(q, k, v, **kwargs):
        return registry.attend(q, k, v, implementation=(implementation,), **kwargs)

    by_name.__name__ = implementation
    return by_name


@functools.cache
def _reference(case: Case, grads: bool) -> tuple[np.ndarray, ...]:
    """``kernels.reference.attention`` in fp32 on the case's inputs: ``(out,)`` or
    ``(out, dq, dk, dv)``. Eager: op by op, each op compiled once per shape, which is cheaper
    here than compiling every case."""
    q, k, v, do, data = case.arrays()
    q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))

    def fn(q, k, v):
        return reference.attention(q, k, v, mask=case.mask_value, **data)

    if not grads:
        return (np.asarray(fn(q, k, v)),)
    out, vjp = jax.vjp(fn, q, k, v)
    return tuple(np.asarray(x) for x in (out, *vjp(do)))


def assert_close(name: str, got, want, tol: tuple[float, float]) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    atol, rtol = tol
    err, bound = np.abs(got - want).max(), atol + rtol * np.abs(want).max()
    assert err <= bound, f"{name}: max |error| {err:.3g} > {bound:.3g}"


class AttentionSuite:
    """Subclass as ``class TestMine(AttentionSuite): implementation = "mine"``."""

    implementation: str | Callable | None = None  # a registry name or a callable
    dtype = "float32"          # of the core cases; an fp16/bf16-only implementation sets bf16
    must_serve_core = False    # True: declining a core case fails instead of skipping
    jit = True                 # compile each call, as a model would; False: op by op

    @pytest.fixture(autouse=True)
    def _strict_dtype_promotion(self):
        with jax.numpy_dtype_promotion("strict"):
            yield

    # --- hooks and helpers ---

    @property
    def fn(self) -> Callable:
        # Through the class: a plain function stored on it must not bind as a method.
        return resolve(type(self).implementation)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))

    def supports(self, case: Case) -> str | None:
        """None when the implementation may serve ``case``, else why not: an override declines
        cases up front. Besides, a ``NotImplementedError`` the implementation raises (while
        tracing, the registry's convention) declines the case it was called on."""
        return None

    def decline(self, case: Case, reason: str) -> NoReturn:
        """Skips the test; fails it when the implementation must serve ``case``."""
        message = f"{self.name} declines this case: {reason}"
        if case.core and self.must_serve_core:
            pytest.fail(f"{message}; {self.name} must serve every core case of the suite "
                        f"({case}).")
        pytest.skip(message)

    @contextlib.contextmanager
    def serving(self, case: Case):
        reason = self.supports(case)
        if reason is not None:
            self.decline(case, reason)
        try:
            yield
        except NotImplementedError as e:
            self.decline(case, str(e) or "NotImplementedError")

    def _run(self, f):
        return _JIT[f] if self.jit else f

    def forward(self, case: Case, q=None, k=None, v=None) -> np.ndarray:
        """The output on the case's inputs (or on ``q``, ``k``, ``v`` given here)."""
        q0, k0, v0, _, data = case.arrays()
        with self.serving(case):
            out = self._run(_forward)(self.fn, q0 if q is None else q,
                                      k0 if k is None else k, v0 if v is None else v, data,
                                      mask=case.mask_value)
        assert out.dtype == q0.dtype and out.shape == q0.shape, (out.dtype, out.shape)
        return np.asarray(out.astype(jnp.float32))

    def value_and_grads(self, case: Case, do=None) -> tuple[np.ndarray, ...]:
        """``(out, dq, dk, dv)`` for the cotangent ``do`` (the case's by default)."""
        q, k, v, do0, data = case.arrays()
        with self.serving(case):
            got = self._run(_value_and_grads)(self.fn, q, k, v, do0 if do is None else do,
                                              data, mask=case.mask_value)
        for x, like in zip(got, (q, q, k, v)):
            assert x.dtype == like.dtype and x.shape == like.shape, (x.dtype, x.shape)
        return tuple(np.asarray(x.astype(jnp.float32)) for x in got)

    def check_forward(self, case: Case) -> np.ndarray:
        out = self.forward(case)
        assert_close("out", out, _reference(case, grads=False)[0], TOLERANCE[case.dtype]["out"])
        return out

    def check_grads(self, case: Case) -> tuple[np.ndarray, ...]:
        got = self.value_and_grads(case)
        tol = TOLERANCE[case.dtype]
        for name, x, want in zip(("out", "dq", "dk", "dv"), got, _reference(case, grads=True)):
            assert_close(name, x, want, tol["out" if name == "out" else "grad"])
        return got

    # --- the suite ---

    def test_dtype_promotion_is_strict(self):
        with pytest.raises(ValueError, match="strict"):
            jnp.ones(2, jnp.float32) + jnp.ones(2, jnp.bfloat16)

    @pytest.mark.parametrize("length", [5, 24, 100])
    @pytest.mark.parametrize("mask", MASKS)
    def test_forward(self, mask, length):
        """Output at lengths that are not tile multiples (ragged edge tiles); 100 spans
        several of the Pallas kernel's default tiles, so banded masks skip some. (13 is in
        every test below.)"""
        self.check_forward(Case(mask, t=length, s=length, dtype=self.dtype))

    @pytest.mark.parametrize("heads", [(2, 2), (4, 2), (3, 1)], ids=["mha", "gqa2", "gqa3"])
    @pytest.mark.parametrize("mask", MASKS)
    def test_gradients(self, mask, heads):
        """Output and dq, dk, dv for G = N / K of 1, 2 and 3 (no power of two, one K/V head:
        every query head's dk/dv lands on the same K/V head)."""
        n, kh = heads
        self.check_grads(Case(mask, n=n, kh=kh, dtype=self.dtype))

    @pytest.mark.parametrize("mask", MASKS)
    def test_bfloat16(self, mask):
        """bf16 in, bf16 out, within bf16 tolerance of the fp32 reference."""
        self.check_grads(Case(mask, dtype="bfloat16"))

    @pytest.mark.parametrize("mask", MASKS)
    def test_segment_ids(self, mask):
        """Packed documents: a query sees only keys of its own document."""
        self.check_grads(Case(mask, segments="packed", dtype=self.dtype))

    @pytest.mark.parametrize("mask", MASKS)
    def test_kv_lengths(self, mask):
        """Keys at or past each row's length are padding."""
        self.check_grads(Case(mask, kv_lengths=(11, 4), dtype=self.dtype))

    @pytest.mark.parametrize("mask", MASKS)
    def test_fewer_queries_than_keys(self, mask):
        """T < S (chunked prefill): queries are aligned bottom-right, so they are the last T
        rows of the square call over the same keys."""
        case = Case(mask, t=5, s=13, dtype=self.dtype)
        out = self.check_grads(case)[0]
        square = dataclasses.replace(case, t=case.s)
        q, k, v, _, _ = case.arrays()
        earlier = square.arrays()[0][:, :case.s - case.t]
        out_square = self.forward(square, q=jnp.concatenate([earlier, q], axis=1), k=k, v=v)
        assert_close("last T rows of the square call", out, out_square[:, case.s - case.t:],
                     TOLERANCE[case.dtype]["out"])

    @pytest.mark.parametrize("hide", ["segment_ids", "kv_lengths"])
    @pytest.mark.parametrize("mask", MASKS)
    def test_fully_masked_rows(self, mask, hide):
        """A query that sees no key returns zeros (no NaN) and passes back zero gradients.

        T > S hides the first rows of causal masks; besides, either a document with no keys
        hides three queries of batch row 0, or a key length of 0 hides all of batch row 1.
        """
        data = {"segments": "orphan"} if hide == "segment_ids" else {"kv_lengths": (5, 0)}
        case = Case(mask, t=13, s=5, dtype=self.dtype, **data)
        hidden = ~case.visible().any(axis=-1)  # [B, T]
        assert hidden[0, 3:6].all() if hide == "segment_ids" else hidden[1].all()
        out, dq, dk, dv = self.check_grads(case)
        assert (out[hidden] == 0.0).all() and (dq[hidden] == 0.0).all()
        assert (np.abs(out[~hidden]).sum(axis=-1) > 0).all() and np.abs(dq[~hidden]).sum() > 0
        if hide == "kv_lengths":
            assert (dk[1] == 0.0).all() and (dv[1] == 0.0).all()  # batch row 1 has no key
        # A loss on the hidden rows alone has no gradient anywhere.
        do = case.arrays()[3]
        do_hidden = jnp.where(jnp.asarray(hidden)[:, :, None, None], do, jnp.zeros_like(do))
        for name, g in zip(("dq", "dk", "dv"), self.value_and_grads(case, do_hidden)[1:]):
            assert (g == 0.0).all(), f"{name} of a loss on hidden rows is not zero"

    @pytest.mark.parametrize("mask", MASKS)
    def test_bias(self, mask):
        """An additive fp32 bias ``[1, N, T, S]`` (T5 relative bias, ALiBi); not core."""
        self.check_forward(Case(mask, bias=True, dtype=self.dtype))
