"""kernels.cpu_attention (the fused C++ kernel) beyond the conformance suite: sizes past one
group of rows and one vector of keys, every GQA ratio the kernel groups differently, rows
that see nothing, vmap, caches of those sizes, shared and missing pages, and what happens
when it cannot be built.

Its outputs and q/k/v gradients are held to ``kernels.reference.attention`` at fp32
tolerance; the conformance suite (``tx.testing``, run by ``test_conformance.py::TestCpu``)
covers every mask kind, segment ids, key lengths and bf16 on small shapes, and its cached,
paged (random block tables, every page no row may read poisoned with NaN) and paged-write
paths, with what it declines (score modifiers, int8 pages, masks that are no band).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import cpu_attention
from tx.kernels import masks as M
from tx.kernels import reference
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

    other_compiler = cpu_attention.library_path("clang++")  # probing it may run clang++
    monkeypatch.setattr(cpu_attention.subprocess, "run", no_compiling)
    assert cpu_attention.build() == built
    # An edited source, or another compiler, is another library.
    edited = tmp_path / "cpu_attention.cc"
    edited.write_text(cpu_attention._SOURCE.read_text() + "\n// an edit\n")
    monkeypatch.setattr(cpu_attention, "_SOURCE", edited)
    assert cpu_attention.library_path("g++") not in (built, other_compiler)
    with pytest.raises(AssertionError, match="compiled again"):
        cpu_attention.build()


# ------------------------------------------------------------------ over a paged KV cache

from tests.kernels import test_paged_attention as paged_cases  # noqa: E402


def test_paged_page_ids_outside_the_pool_read_as_empty():
    q, k, v, table, lens = paged_cases._pool([9, 20], n=4, kh=2, h=16, page=4, t=2)
    table = table.at[0, 0].set(-1).at[1, 2].set(k.shape[1] + 5)
    got = cpu_attention.paged_attention(q, k, v, table, lens, mask=M.Causal())
    want = reference.paged_attention(q, k, v, table, lens, mask=M.Causal())
    _close("out", got, want)


# ------------------------------------------------------------- over a contiguous KV cache


def _cache_positions(lengths, t, s):
    """The positions a contiguous cache reports: queries at the end of each row's keys,
    unwritten slots at -1."""
    lengths = jnp.asarray(lengths, jnp.int32)[:, None]
    q_pos = lengths - t + jnp.arange(t, dtype=jnp.int32)[None]
    slots = jnp.arange(s, dtype=jnp.int32)[None]
    return q_pos, jnp.where(slots < lengths, slots, -1)


# (lengths per row, T, S, N, K, H): a decode step, a prefill into an empty cache, a chunk
# into a part-filled one, a full cache; GQA 3:1, 4:1, 1:1 and MQA; head dims and key counts
# that are not whole vectors.
CACHED = [([9, 37], 1, 40, 6, 2, 24), ([17, 17], 17, 64, 8, 2, 32), ([30, 12], 5, 33, 4, 4, 40),
          ([50, 50], 3, 50, 8, 1, 16)]


@pytest.mark.parametrize("case", CACHED, ids=lambda c: "L{}_T{}_S{}_N{}_K{}_H{}".format(
    "-".join(map(str, c[0])), *c[1:]))
@pytest.mark.parametrize("mask", [M.Causal(), M.Local(6), M.Full(), M.Local(3, 2)], ids=repr)
def test_cached_matches_reference_at_the_cache_positions(case, mask):
    lengths, t, s, n, k, h = case
    q, kk, v, _ = _inputs(len(lengths), t, s, n, k, h, seed=3)
    # Slots past a row's length hold NaN: the kernel must never read them.
    unwritten = jnp.arange(s)[None, :, None, None] >= jnp.asarray(lengths)[:, None, None, None]
    k_bad, v_bad = (jnp.where(unwritten, jnp.nan, x) for x in (kk, v))
    q_pos, kv_pos = _cache_positions(lengths, t, s)
    want = reference.attention(q, kk, v, mask=mask, q_positions=q_pos, kv_positions=kv_pos)
    got = jax.jit(lambda *a: cpu_attention.cached_attention(*a, mask=mask))(
        q, k_bad, v_bad, jnp.asarray(lengths, jnp.int32))
    _close("out", got, want)


def test_cached_rows_that_see_no_key_are_zero():
    # Row 0's cache is empty: its queries sit at negative positions and see no key.
    q, k, v, _ = _inputs(2, 3, 16, 4, 2, 16)
    got = cpu_attention.cached_attention(q, k, v, jnp.asarray([0, 8], jnp.int32),
                                         mask=M.Causal())
    assert not bool(jnp.isnan(got).any())
    assert float(jnp.abs(got[0]).max()) == 0.0  # row 0's cache is empty: nothing to see
    q_pos, kv_pos = _cache_positions([0, 8], 3, 16)
    want = reference.attention(q, k, v, mask=M.Causal(), q_positions=q_pos, kv_positions=kv_pos)
    _close("out", got[1], want[1])


@pytest.mark.parametrize("t", [1, 3])
def test_paged_write_stores_the_tokens_then_attends_as_after_a_scatter(t):
    # Rows 0 and 1 share their first page (a prefix); row 2's last table entry names no page,
    # so a token that lands there is dropped. GQA 3:1.
    rng = np.random.default_rng(5)
    kh, pages, page, h, n = 2, 12, 4, 16, 6
    k_pages = jnp.asarray(rng.standard_normal((kh, pages, page, h)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((kh, pages, page, h)), jnp.float32)
    table = jnp.asarray([[0, 1, 2, 3], [0, 5, 6, 7], [8, 9, 10, -1]], jnp.int32)
    lengths = jnp.asarray([9, 14, 14], jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, t, n, h)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((3, t, kh, h)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((3, t, kh, h)), jnp.float32)
    want_k, want_v = k_pages, v_pages
    for b in range(3):
        for i in range(t):
            pos = int(lengths[b]) - t + i
            page_id = int(table[b, pos // page])
            if page_id >= 0:
                want_k = want_k.at[:, page_id, pos % page].set(k_new[b, i])
                want_v = want_v.at[:, page_id, pos % page].set(v_new[b, i])
    want = reference.paged_attention(q, want_k, want_v, table, lengths, mask=M.Causal())
    out, got_k, got_v = jax.jit(lambda *a: cpu_attention.paged_write_attention(
        *a, mask=M.Causal()))(q, k_new, v_new, k_pages, v_pages, table, lengths)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    _close("out", out, want)


def test_paged_write_declines_quantised_pages_and_score_mods():
    q, k, v, table, lens = paged_cases._pool([5], n=4, kh=2, h=16, page=4)
    new = jnp.zeros((1, 1, 2, 16), jnp.float32)
    with pytest.raises(NotImplementedError, match="fp32 pages"):
        cpu_attention.paged_write_attention(q, new, new, k.astype(jnp.bfloat16),
                                            v.astype(jnp.bfloat16), table, lens)
    with pytest.raises(NotImplementedError, match="score_mod"):
        cpu_attention.paged_write_attention(q, new, new, k, v, table, lens, score_mod=object())
