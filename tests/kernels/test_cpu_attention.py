"""kernels.cpu_attention (the fused C++ kernel) beyond the conformance suite: sizes past one
group of rows and one vector of keys, every GQA ratio the kernel groups differently, rows
that see nothing, vmap, and what happens when it cannot be built.

Its outputs and q/k/v gradients are held to ``kernels.reference.attention`` at fp32
tolerance; the conformance suite (``test_conformance.py::TestCpu``) covers every mask kind,
segment ids, key lengths and bf16 on small shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu_attention
from kernels import masks as M
from kernels import reference
from tx.attention import registry

ATOL = RTOL = 1e-5


def _close(name, got, want):
    err = float(jnp.max(jnp.abs(got - want)))
    bound = ATOL + RTOL * float(jnp.max(jnp.abs(want)))
    assert err <= bound, f"{name}: max abs error {err:.2e} > {bound:.2e}"


def _inputs(b, t, s, n, k, h, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h), (b, t, n, h)))


def _value_and_grads(fn, q, k, v, do, **kwargs):
    def loss(q, k, v):
        out = fn(q, k, v, **kwargs)
        return jnp.sum(out * do), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


# (T, S, N, K, H): T*G pairs that leave a partial last group of four, keys that are not a
# whole number of 16-lane vectors, head dims that are not (padded inside), G = 1, 2, 3, 4, 8.
SHAPES = [(300, 300, 6, 2, 40), (77, 203, 4, 4, 16), (129, 129, 8, 1, 64), (50, 50, 2, 1, 100),
          (33, 97, 8, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_S{}_N{}_K{}_H{}".format(*s))
@pytest.mark.parametrize("mask", [M.Causal(), M.Local(20), M.Full(), M.Local(5, 9),
                                  M.Strided(7) & M.Local(60)], ids=repr)
def test_matches_reference(shape, mask):
    t, s, n, k, h = shape
    q, kk, v, do = _inputs(2, t, s, n, k, h)
    got = _value_and_grads(cpu_attention.attention, q, kk, v, do, mask=mask)
    want = _value_and_grads(reference.attention, q, kk, v, do, mask=mask)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        _close(name, x, y)


def test_rows_that_see_nothing_give_zeros_and_zero_gradients():
    # Fewer keys than queries under a causal mask: the first T - S rows see no key; a batch
    # row with key length 0 sees none at all; packed segments with no key of their own.
    q, k, v, do = _inputs(3, 40, 24, 4, 2, 16)
    lengths = jnp.asarray([24, 0, 10], jnp.int32)
    q_seg = jnp.asarray(np.repeat([[0] * 30 + [9] * 10], 3, 0), jnp.int32)
    kv_seg = jnp.zeros((3, 24), jnp.int32)
    kwargs = dict(mask=M.Causal(), kv_lengths=lengths, segment_ids=(q_seg, kv_seg))
    out, dq, dk, dv = _value_and_grads(cpu_attention.attention, q, k, v, do, **kwargs)
    for x in (out, dq, dk, dv):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert float(jnp.abs(out[:, :16]).max()) == 0.0 and float(jnp.abs(dq[:, :16]).max()) == 0.0
    assert float(jnp.abs(out[1]).max()) == 0.0 and float(jnp.abs(dk[1]).max()) == 0.0
    assert float(jnp.abs(out[:, 30:]).max()) == 0.0  # segment 9 has no keys
    want = _value_and_grads(reference.attention, q, k, v, do, **kwargs)
    for name, x, y in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        _close(name, x, y)


def test_vmap_over_a_leading_axis():
    q, k, v, _ = _inputs(2, 19, 19, 4, 2, 8)
    stack = lambda x: jnp.stack([x, 2 * x])
    got = jax.vmap(lambda q, k, v: cpu_attention.attention(q, k, v, mask=M.Causal()))(
        stack(q), stack(k), stack(v))
    for i in range(2):
        want = reference.attention(stack(q)[i], stack(k)[i], stack(v)[i], mask=M.Causal())
        _close(f"vmapped[{i}]", got[i], want)


@pytest.mark.parametrize("kwargs,named", [
    (dict(bias=jnp.zeros((1, 4, 9, 9))), "bias"),
    (dict(q_positions=jnp.zeros((1, 9), jnp.int32)), "q_positions"),
    (dict(score_mod=object()), "score_mod")])
def test_declines_what_it_does_not_serve_and_the_registry_falls_through(kwargs, named):
    q, k, v, _ = _inputs(1, 9, 9, 4, 2, 8)
    with pytest.raises(NotImplementedError, match=named):
        cpu_attention.attention(q, k, v, mask=M.Causal(), **kwargs)
    if named == "bias":
        got = registry.attend(q, k, v, mask=M.Causal(), implementation=("cpu", "xla"), **kwargs)
        _close("fallback", got, reference.attention(q, k, v, mask=M.Causal(), **kwargs))


def test_a_long_non_band_mask_is_left_to_xla(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_MAX_DENSE_MAP", 80)
    q, k, v, _ = _inputs(1, 9, 9, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dense map"):
        cpu_attention.attention(q, k, v, mask=M.Strided(3))
    cpu_attention.attention(q, k, v, mask=M.Causal())  # a band needs no map


def test_a_missing_compiler_is_a_clear_decline(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-tx")
    monkeypatch.setenv("TX_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(cpu_attention.BuildError, match=r"\$CXX='no-such-compiler-tx'"):
        cpu_attention.build()


def test_a_failed_compile_names_the_command_and_the_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_attention, "_SOURCE", broken)
    monkeypatch.setenv("TX_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_attention.BuildError, match="compiling broken.cc failed"):
        cpu_attention.build()
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written is left


def test_a_failed_build_falls_through_to_the_next_implementation(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_failure", cpu_attention.BuildError("no compiler here"))
    q, k, v, _ = _inputs(1, 9, 9, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="no compiler here"):
        registry.attend(q, k, v, mask=M.Causal(), implementation=("cpu",))
    got = registry.attend(q, k, v, mask=M.Causal(), implementation=("cpu", "xla"))
    _close("fallback", got, reference.attention(q, k, v, mask=M.Causal()))


def test_the_library_is_cached_by_source(monkeypatch, tmp_path):
    built = cpu_attention.build()  # the tests above have compiled it: found, not rebuilt
    assert built == cpu_attention.library_path(cpu_attention._compiler()) and built.exists()

    def no_compiling(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(cpu_attention.subprocess, "run", no_compiling)
    assert cpu_attention.build() == built
    # An edited source, or another compiler, is another library.
    edited = tmp_path / "cpu_attention.cc"
    edited.write_text(cpu_attention._SOURCE.read_text() + "\n// an edit\n")
    monkeypatch.setattr(cpu_attention, "_SOURCE", edited)
    assert cpu_attention.library_path("g++") not in (built, cpu_attention.library_path("clang++"))
    with pytest.raises(AssertionError, match="compiled again"):
        cpu_attention.build()


# ------------------------------------------------------------------ over a paged KV cache

from tests.kernels import test_paged_attention as paged_cases  # noqa: E402


@pytest.mark.parametrize("case", paged_cases.CASES, ids=list(paged_cases.CASES))
def test_paged_matches_reference_reading_only_its_pages(case):
    # The Pallas kernel's cases: every page no row may read is NaN, so one stray read shows.
    lengths, n, kh, h, page, t, mask, _, _, dtype = paged_cases.CASES[case]
    q, k, v, table, lens = paged_cases._pool(lengths, n=n, kh=kh, h=h, page=page, t=t,
                                             dtype=dtype, max_pages=-(-max(lengths) // page) + 1)
    if mask is not None and mask.band() is None:
        with pytest.raises(NotImplementedError, match="not a band"):
            cpu_attention.paged_attention(q, k, v, table, lens, mask=mask)
        return
    want = paged_cases._reference(q, k, v, table, lens, mask=mask)
    k_bad, v_bad = paged_cases._poison(k, v, table, lens, mask, t, page)
    got = jax.jit(lambda *a: cpu_attention.paged_attention(*a, mask=mask))(
        q, k_bad, v_bad, table, lens)
    assert got.dtype == q.dtype
    paged_cases._assert_close(got, want, dtype)


def test_paged_page_ids_outside_the_pool_read_as_empty():
    q, k, v, table, lens = paged_cases._pool([9, 20], n=4, kh=2, h=16, page=4, t=2)
    table = table.at[0, 0].set(-1).at[1, 2].set(k.shape[1] + 5)
    got = cpu_attention.paged_attention(q, k, v, table, lens, mask=M.Causal())
    want = reference.paged_attention(q, k, v, table, lens, mask=M.Causal())
    _close("out", got, want)


def test_paged_declines_int8_pages_and_score_mods():
    q, k, v, table, lens = paged_cases._pool([5], n=4, kh=2, h=16, page=4)
    with pytest.raises(NotImplementedError, match="k_scales"):
        cpu_attention.paged_attention(q, k, v, table, lens, k_scales=jnp.ones(k.shape[:3]),
                                      v_scales=jnp.ones(k.shape[:3]))
    with pytest.raises(NotImplementedError, match="score_mod"):
        cpu_attention.paged_attention(q, k, v, table, lens, score_mod=object())
