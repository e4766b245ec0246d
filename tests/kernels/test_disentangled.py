"""kernels.row_tables: DeBERTa's disentangled attention as a score modifier with a table per
query row (c2p) and per key column (p2c).

The reference against a plain numpy reading of the definition; the flash kernel (interpret
mode on CPU) against the reference, forward and the gradients of q, k, v and both tables, on
lengths that are no tile multiple, GQA, padded and fully masked rows; CUDA lowering; and
every refusal by name (calls the tables do not fit, the cached and paged paths). The log
buckets are checked against ``transformers`` in tests/tx/test_deberta.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks as M
from tx.kernels import reference, row_tables, score_mods
from tx.kernels.block_sizes import BlockSizes
from tx.kernels.flash_attention import flash_attention
from tx.kernels.paged_attention import paged_attention

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16,
                   block_k_dkv=16)
BUCKETS, MAX_REL = 8, 20  # span 8: 16 table columns


def _inputs(b, t, n, kh, h, terms=("c2p", "p2c"), seed=0):
    rng = np.random.default_rng(seed)

    def f(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    q, k, v, do = f(b, t, n, h), f(b, t, kh, h), f(b, t, kh, h), f(b, t, n, h)
    tables = {name: f(b, t, n, 2 * BUCKETS, scale=0.7) for name in terms}
    return q, k, v, do, tables


def _mod(tables, **kw):
    return row_tables.Disentangled(tables.get("c2p"), tables.get("p2c"), BUCKETS, MAX_REL,
                                   content_scale=3 ** -0.5, **kw)


def test_reference_is_the_definition():
    """s * c + c2p[b, i, n, idx(i, j)] + p2c[b, j, n, idx(i, j)], read with numpy gathers."""
    b, t, n, kh, h = 2, 11, 4, 2, 8
    q, k, v, _, tables = _inputs(b, t, n, kh, h)
    lengths = np.asarray([11, 6], np.int32)
    got = jax.jit(lambda q, k, v, tables: reference.attention(
        q, k, v, kv_lengths=jnp.asarray(lengths), score_mod=_mod(tables)))(q, k, v, tables)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    idx = np.asarray(row_tables.relative_index(jnp.asarray(i), jnp.asarray(j),
                                               position_buckets=BUCKETS,
                                               max_relative_positions=MAX_REL))
    kr, vr = (np.repeat(np.asarray(x), n // kh, axis=2) for x in (k, v))
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q), kr) * h ** -0.5 * 3 ** -0.5
    c2p = np.asarray(tables["c2p"]).transpose(0, 2, 1, 3)                  # [B, N, T, R]
    p2c = np.asarray(tables["p2c"]).transpose(0, 2, 1, 3)                  # [B, N, S, R]
    s = s + np.take_along_axis(c2p, np.broadcast_to(idx, (b, n, t, t)), axis=-1)
    s = s + np.take_along_axis(p2c, np.broadcast_to(idx.T, (b, n, t, t)),
                               axis=-1).transpose(0, 1, 3, 2)
    s = np.where(np.arange(t)[None, None, None, :] < lengths[:, None, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


CASES = {  # name: (T, N, K, terms, mask, lengths, chained modifier)
    "both-gqa2-ragged": (37, 4, 2, ("c2p", "p2c"), None, (37, 20), None),
    "c2p-gqa2-folded-causal": (21, 4, 2, ("c2p",), M.Causal(), (21, 9), None),
    "p2c-mha-empty-row-softcap": (19, 2, 2, ("p2c",), None, (19, 0), score_mods.SoftCap(3.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_matches_reference_with_table_gradients(name):
    t, n, kh, terms, mask, lengths, extra = CASES[name]
    q, k, v, do, tables = _inputs(2, t, n, kh, 16, terms)
    lengths = jnp.asarray(lengths, jnp.int32)

    def run(fn):
        @jax.jit  # one compile: cheaper than running the interpreter op by op
        def value_and_grads(q, k, v, tables):
            def attend(q, k, v, tables):
                mod = score_mods.chain(_mod(tables), extra)
                return fn(q, k, v, mask=mask, kv_lengths=lengths, score_mod=mod)
            out, pull = jax.vjp(attend, q, k, v, tables)
            return out, pull(do)
        return value_and_grads(q, k, v, tables)

    want, want_grads = run(reference.attention)
    got, got_grads = run(lambda *a, **kw: flash_attention(*a, block_sizes=SMALL, **kw))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    flat_got, flat_want = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    assert len(flat_got) == 3 + len(terms)
    for x, y in zip(flat_got, flat_want):
        assert np.isfinite(np.asarray(x)).all()
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)
    for table in got_grads[3].values():  # the tables learn (rows past a length do not)
        assert np.abs(np.asarray(table)).max() > 1e-3
    if not int(lengths[1]):  # a batch row without keys: zeros, no NaN, no table gradient
        assert not np.asarray(got)[1].any()
        assert all(not np.asarray(g)[1].any() for g in got_grads[3].values())


def test_every_table_configuration_lowers_for_cuda():
    from jax import export
    check = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    q, k, v, _, tables = _inputs(1, 40, 4, 2, 64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

    def step(q, k, v, tables):
        def loss(q, k, v, tables):
            out = flash_attention(q, k, v, mask=M.Local(8), score_mod=_mod(tables),
                                  interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, tables)

    for terms in (("c2p",), ("p2c",), ("c2p", "p2c")):
        sub = {name: tables[name] for name in terms}
        text = export.export(jax.jit(step), platforms=["cuda"], disabled_checks=[check])(
            q, k, v, sub).mlir_module()
        assert text.count("__gpu$xla.gpu.triton") >= 3, terms  # forward, dq, dk/dv


# --- refusals by name ---------------------------------------------------------------------------

def test_calls_the_tables_do_not_fit_are_refused_by_name():
    q, k, v, _, tables = _inputs(1, 8, 2, 2, 8)
    mod = _mod(tables)
    with pytest.raises(ValueError, match="T == S"):  # cross-attention / a cache's keys
        reference.attention(q, jnp.concatenate([k, k], 1), jnp.concatenate([v, v], 1),
                            score_mod=mod)
    with pytest.raises(ValueError, match="T == S"):
        flash_attention(q[:, :4], k[:, :4], v[:, :4], score_mod=mod)
    with pytest.raises(ValueError, match="q_positions"):
        reference.attention(q, k, v, score_mod=mod,
                            q_positions=jnp.arange(8, dtype=jnp.int32)[None])
    with pytest.raises(ValueError, match=r"Disentangled.c2p.shape"):
        reference.attention(q, k, v, score_mod=_mod({"c2p": tables["c2p"][..., :6]}))
    with pytest.raises(ValueError, match="Disentangled.c2p"):
        reference.attention(q, k, v, score_mod=_mod({}))
    with pytest.raises(ValueError, match="position_buckets"):
        reference.attention(q, k, v, score_mod=row_tables.Disentangled(
            tables["c2p"], None, position_buckets=2, max_relative_positions=20))
    with pytest.raises(ValueError, match="more than one modifier with row/column tables"):
        reference.attention(q, k, v, score_mod=score_mods.chain(mod, _mod(tables)))
    pages = jnp.zeros((2, 4, 4, 8), jnp.float32)
    for paged in (reference.paged_attention, paged_attention):  # called directly, not declined
        with pytest.raises(ValueError, match="Disentangled holds row/column tables"):
            paged(q[:, :1], pages, pages, jnp.zeros((1, 2), jnp.int32),
                  jnp.asarray([5], jnp.int32), score_mod=mod)


def test_cache_paths_decline_by_name():
    from tx.attention import Decline, calls
    from tx.attention import backends
    q, k, v, _, tables = _inputs(1, 8, 2, 2, 8)
    mod = _mod(tables)
    pages = jnp.zeros((2, 4, 4, 8), jnp.float32)
    lengths, block_tables = jnp.asarray([5], jnp.int32), jnp.zeros((1, 2), jnp.int32)
    paged = calls.Paged(q[:, :1], pages, pages, block_tables, lengths, score_mod=mod)
    for backend in (backends.Pallas(), backends.Xla()):
        with pytest.raises(Decline, match="Disentangled holds row/column tables"):
            backend.paged(paged)
    with pytest.raises(Decline, match="Disentangled holds row/column tables"):
        backends.Pallas().cached(calls.Cached(q[:, :1], k, v, lengths, score_mod=mod))
