"""Ring attention over the ``context`` mesh axis (Liu et al., "Ring Attention with Blockwise
Transformers", 2023; the load-balanced "zigzag" layout of Brandon et al., "Striped
Attention", and of Megatron's context parallelism).

Under ``shard_map`` each of the ``c`` devices of the axis keeps its queries and passes its
K/V block around the ring (``ppermute``), ``c`` steps in all. A step's partial result
``(o_p, lse_p)`` (normalised output and log-sum-exp per query row and head) is merged into
the running one with the online-softmax rule::

    L = logaddexp(L, lse_p);  O = O * exp(L_old - L) + o_p * exp(lse_p - L)

The backward pass (``custom_vjp``) walks the ring again: each device re-runs its steps'
blocks with the cotangents ``w_p * dO`` for ``o_p`` and ``w_p * <dO, o_p - O>`` for
``lse_p`` (``w_p = exp(lse_p - L)``), so a block's gradient needs nothing but the saved
``O`` and ``L``; dK/dV accumulate in buffers that travel with their K/V block and take one
last hop home.

Layout. The sequence is cut into ``2c`` chunks; device ``d`` holds two of them: chunks
``(d, 2c-1-d)`` in the zigzag layout (every device then has as many causal tiles as any
other) or ``(2d, 2d+1)`` in the contiguous one. ``layout="auto"`` picks the one whose
critical path (the sum over ring steps of the busiest device's tiles) is shorter.

Skipping. The mask's tile map at chunk granularity (``mask.tile_map``) says, for every
device, ring step and pair of (query chunk, key chunk), whether any pair is visible; an empty
pair is skipped (``lax.cond``: neither logits nor FLOPs, forward and backward) and its K/V
passed on unread. Segment ids and key lengths are data: they mask inside the blocks, and skip
a pair where no row's segment-id ranges meet or every key lies past the row's length.

Positions are global: a device evaluates the mask and the score modifier (ALiBi, T5
buckets, ...) at the positions its chunks hold in the whole sequence, and a head index
offset by its ``tensor`` shard, so a sharded run computes the logits of the unsharded one.
A sink logit (``score_mods.Sinks``) joins each row's denominator once, not once per block:
the ring returns the rows' log-sum-exp too (differentiable), and the sink is merged after
it (:func:`_merge_sinks`).

Each block runs through the device's backend order (``implementation``, as every attention
call): the ``block`` path (``tx.attention.calls.Block``, ``tx.parallel.blocks``) returns the
block's output and log-sum-exp, and its gradients given cotangents for both. ``pallas``
serves it with the flash kernel (at the pair's local mask: ``Full`` or a shifted band),
``xla`` with ``jnp`` einsums at global positions (every case); the ``cpu`` kernel has no
such path yet, so on a CPU the order falls to ``xla``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from tx.attention import calls, registry
from tx.kernels import masks as masks_lib
from tx.kernels import score_mods
from tx.parallel import blocks, per_shard
from tx.parallel import shard as shard_lib
from tx.parallel.blocks import NEG

AXIS = "context"
LAYOUTS = ("zigzag", "contiguous", "auto")


# ------------------------------------------------------------------------------ the plan (host)

def chunk_ids(layout: str, c: int) -> np.ndarray:
    """``[c, 2]``: the global chunk indices (of ``2c``) each device holds, in local order."""
    d = np.arange(c)
    if layout == "zigzag":
        return np.stack([d, 2 * c - 1 - d], axis=1)
    return np.stack([2 * d, 2 * d + 1], axis=1)


def token_order(layout: str, c: int, length: int) -> np.ndarray:
    """Global position of each token in the sharded order (device 0's tokens first)."""
    chunk = length // (2 * c)
    ids = chunk_ids(layout, c).reshape(-1)
    return (ids[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def visits(mask: masks_lib.Mask, layout: str, c: int, t: int, s: int) -> np.ndarray:
    """``[c, c, 2, 2]`` bool: at ring step ``j`` device ``d`` (holding the K/V block of device
    ``(d - j) % c``) computes the pair (its query chunk ``a``, that block's key chunk ``b``)."""
    tiles = mask.tile_map(t, s, t // (2 * c), s // (2 * c))  # [2c, 2c]
    ids = chunk_ids(layout, c)
    out = np.zeros((c, c, 2, 2), bool)
    for d in range(c):
        for j in range(c):
            owner = (d - j) % c
            out[d, j] = tiles[np.ix_(ids[d], ids[owner])] != masks_lib.EMPTY
    return out


def critical_path(table: np.ndarray) -> int:
    """Tile computations on the critical path: every ring step waits for its busiest device."""
    return int(table.sum(axis=(2, 3)).max(axis=0).sum())


def choose_layout(mask: masks_lib.Mask, c: int, t: int, s: int) -> str:
    """The layout with the shorter critical path (zigzag for causal, contiguous for a
    bidirectional window, either for a full mask)."""
    cost = {lay: critical_path(visits(mask, lay, c, t, s)) for lay in ("zigzag", "contiguous")}
    return min(cost, key=lambda lay: (cost[lay], lay != "zigzag"))


def stats(mask: masks_lib.Mask, layout: str, c: int, t: int, s: int) -> dict:
    """Skipped work and balance of a plan (what the benchmark reports)."""
    table = visits(mask, layout, c, t, s)
    per_device = table.sum(axis=(1, 2, 3))
    return {"layout": layout,
            "skipped_steps": float((~table.any(axis=(2, 3))).mean()),
            "skipped_tiles": float(1.0 - table.mean()),
            "imbalance": float(per_device.max() / max(per_device.mean(), 1e-9)),
            "critical_path_tiles": critical_path(table),
            "balanced_tiles": float(table.sum() / c)}


def check_length(name: str, length: int, c: int) -> None:
    if length % (2 * c):
        raise ValueError(
            f"{name}={length} must be divisible by 2 * mesh.context = {2 * c}: ring attention "
            f"cuts the sequence into {2 * c} chunks (two per device); pad or pack the sequence "
            f"to a multiple of {2 * c}, or use a smaller mesh.context.")


def check_score_mod(score_mod, num_heads: int):
    return score_mods.check(score_mod, num_heads)


def _merge_sinks(o, lse, sinks):
    """A sink joins each row's softmax once, as one more term of its denominator:
    ``L' = logaddexp(L, sink)``, ``o' = o exp(L - L')`` (a row that sees no key stays 0)."""
    new = jnp.logaddexp(lse, sinks.astype(jnp.float32)[None, None, :])     # [B, T, N]
    return (o.astype(jnp.float32) * jnp.exp(lse - new)[..., None]).astype(o.dtype)


# ------------------------------------------------------------------------------- one block

@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced ring specialises on (hashable)."""

    mask: Any
    scale: float
    c: int
    t: int
    s: int
    num_heads: int  # all query heads (the score modifier's head index is global)
    layout: str
    table: Any  # visits(), hashable by value (_Table)
    kinds: Any  # [c, c, 2, 2] index into ``local`` per visited pair (_Table)
    local: tuple  # the pairs' distinct local masks (blocks.local_masks)
    implementation: tuple  # the backend order each block is served by
    axis: str
    other_axes: tuple  # mesh axes that split rows or heads (the modifier's gradients sum)
    batch_axes: Any
    head_axis: Any
    kv_split: bool  # K/V heads split like the query heads (False: one K/V head, replicated)


def _block(st: _Static, kind, q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_len, score_mod,
           head0, batch0):
    """One (query chunk, key chunk) pair through the backends: ``(o [B,t,N,H] fp32,
    lse [B,t,N] fp32)``. ``kind`` (traced) picks the pair's local mask from the plan
    (``blocks.local_masks``): a kernel specialises on it, so each kind is one branch."""
    segments = None if q_seg is None else (q_seg, kv_seg)

    def branch(local):
        def serve(q, k, v, score_mod):
            call = calls.Block(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                               seq_len=st.s, scale=st.scale, mask=st.mask, local_mask=local,
                               segment_ids=segments, kv_lengths=kv_len, score_mod=score_mod,
                               head0=head0, batch0=batch0, num_heads=st.num_heads)
            with shard_lib.use(None):  # already per shard: backends must not wrap it again
                return registry.serve("block", call, st.implementation)
        return serve

    if len(st.local) == 1:
        return branch(st.local[0])(q, k, v, score_mod)
    return lax.switch(kind, [branch(m) for m in st.local], q, k, v, score_mod)


def _live(planned, q_seg, kv_seg, kv_pos, kv_len):
    """Whether a chunk pair the mask shows may hold a visible pair once the data narrow it:
    in some row, the chunks' segment-id ranges meet and a key lies before ``kv_len``."""
    live = planned
    if q_seg is not None:
        live &= jnp.any((q_seg.min(axis=1) <= kv_seg.max(axis=1)) &
                        (kv_seg.min(axis=1) <= q_seg.max(axis=1)))
    if kv_len is not None:
        live &= jnp.any(kv_pos[0] < kv_len)
    return live


def _merge(acc, part):
    o, lse = acc
    o_p, lse_p = part
    new = jnp.logaddexp(lse, lse_p)
    o = o * jnp.exp(lse - new)[..., None] + o_p * jnp.exp(lse_p - new)[..., None]
    return o, new


# ---------------------------------------------------------------------- the ring, per device

def _offsets(st: _Static, b_local: int, n_local: int):
    """This shard's first global head and first global batch row (a modifier reads them)."""
    head0 = jnp.int32(0) if st.head_axis is None else lax.axis_index(st.head_axis) * n_local
    batch0 = jnp.int32(0)
    if st.batch_axes:
        axes = (st.batch_axes,) if isinstance(st.batch_axes, str) else st.batch_axes
        index = jnp.int32(0)
        for a in axes:  # row-major over the batch axes, as the sharding lays rows out
            index = index * lax.psum(1, a) + lax.axis_index(a)
        batch0 = index * b_local
    return head0.astype(jnp.int32), jnp.asarray(batch0, jnp.int32)


def _positions(st: _Static, device, length):
    """``[2, length // (2c)]`` global positions of the two chunks of ``device``."""
    chunk = length // (2 * st.c)
    ids = jnp.asarray(chunk_ids(st.layout, st.c), jnp.int32)[device]        # [2]
    return ids[:, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]


def _halves(x):
    """``[B, L, ...]`` -> its two chunks (None stays None)."""
    if x is None:
        return (None, None)
    half = x.shape[1] // 2
    return (x[:, :half], x[:, half:])


def _rotate(st: _Static, tree):
    perm = [(i, (i + 1) % st.c) for i in range(st.c)]
    return jax.tree.map(lambda x: lax.ppermute(x, st.axis, perm), tree)


def _forward_local(st: _Static, q, k, v, q_seg, kv_seg, kv_len, score_mod):
    d = lax.axis_index(st.axis)
    head0, batch0 = _offsets(st, q.shape[0], q.shape[2])
    table = jnp.asarray(np.asarray(st.table))
    kinds = jnp.asarray(np.asarray(st.kinds))
    qs, q_segs = _halves(q), _halves(q_seg)
    q_pos = _positions(st, d, st.t) + (st.s - st.t)  # bottom-right aligned
    acc = [(jnp.zeros((*qa.shape[:3], v.shape[-1]), jnp.float32),  # v's head dim (MLA)
            jnp.full(qa.shape[:3], NEG, jnp.float32)) for qa in qs]

    def visit(j, acc, block):
        kv_pos = _positions(st, (d - j) % st.c, st.s)
        ks, vs, kv_segs = _halves(block[0]), _halves(block[1]), _halves(block[2])
        acc = list(acc)
        for a in range(2):
            for bb in range(2):
                def step(carry, a=a, bb=bb):
                    part = _block(st, kinds[d, j, a, bb], qs[a], ks[bb], vs[bb], q_pos[a],
                                  kv_pos[bb], q_segs[a], kv_segs[bb], kv_len, score_mod,
                                  head0, batch0)
                    return _merge(carry, part)
                live = _live(table[d, j, a, bb], q_segs[a], kv_segs[bb], kv_pos[bb], kv_len)
                acc[a] = lax.cond(live, step, lambda carry: carry, acc[a])
        return acc

    # A loop, not c unrolled copies: one step's program compiles once whatever the ring size.
    acc, block = lax.fori_loop(
        0, st.c - 1, lambda j, carry: (visit(j, *carry), _rotate(st, carry[1])),
        (acc, (k, v, kv_seg)))
    acc = visit(st.c - 1, acc, block)  # the last block needs no further hop
    o = jnp.concatenate([acc[0][0], acc[1][0]], axis=1)
    lse = jnp.concatenate([acc[0][1], acc[1][1]], axis=1)
    return o.astype(q.dtype), lse


def _backward_local(st: _Static, q, k, v, q_seg, kv_seg, kv_len, score_mod, o, lse, do,
                    dlse):
    d = lax.axis_index(st.axis)
    head0, batch0 = _offsets(st, q.shape[0], q.shape[2])
    table = jnp.asarray(np.asarray(st.table))
    kinds = jnp.asarray(np.asarray(st.kinds))
    qs, q_segs = _halves(q), _halves(q_seg)
    os_, lses, dos = _halves(o.astype(jnp.float32)), _halves(lse), _halves(do.astype(jnp.float32))
    dlses = _halves(dlse)
    q_pos = _positions(st, d, st.t) + (st.s - st.t)
    dq = [jnp.zeros(qa.shape, jnp.float32) for qa in qs]
    d_mod = jax.tree.map(jnp.zeros_like, score_mod)
    grads = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    half = k.shape[1] // 2

    def visit(j, carry, block):
        dq, grads, d_mod = carry
        dq = list(dq)
        kv_pos = _positions(st, (d - j) % st.c, st.s)
        ks, vs, kv_segs = _halves(block[0]), _halves(block[1]), _halves(block[2])
        for a in range(2):
            for bb in range(2):
                def step(carry, a=a, bb=bb):
                    dq_a, dkv, dm = carry

                    def f(qa, kb, vb, mod):
                        return _block(st, kinds[d, j, a, bb], qa, kb, vb, q_pos[a],
                                      kv_pos[bb], q_segs[a], kv_segs[bb], kv_len, mod, head0,
                                      batch0)
                    (o_p, lse_p), vjp = jax.vjp(f, qs[a], ks[bb], vs[bb], score_mod)
                    w = jnp.exp(lse_p - lses[a])                            # [B, t, N]
                    # O = sum_p w_p o_p and L = logsumexp_p lse_p: both move with lse_p.
                    d_lse = w * (jnp.sum(dos[a] * (o_p - os_[a]), axis=-1) + dlses[a])
                    gq, gk, gv, gm = vjp((w[..., None] * dos[a], d_lse))
                    rows = slice(bb * half, (bb + 1) * half)
                    dkv = (dkv[0].at[:, rows].add(gk.astype(jnp.float32)),
                           dkv[1].at[:, rows].add(gv.astype(jnp.float32)))
                    dm = jax.tree.map(jnp.add, dm, gm)
                    return dq_a + gq.astype(jnp.float32), dkv, dm
                live = _live(table[d, j, a, bb], q_segs[a], kv_segs[bb], kv_pos[bb], kv_len)
                dq[a], grads, d_mod = lax.cond(live, step, lambda carry: carry,
                                               (dq[a], grads, d_mod))
        return dq, grads, d_mod

    def hop(j, carry):  # dK/dV travel with their K/V block
        (dq, grads, d_mod), block = carry
        dq, grads, d_mod = visit(j, (dq, grads, d_mod), block)
        block, grads = _rotate(st, (block, grads))
        return (dq, grads, d_mod), block

    (dq, grads, d_mod), block = lax.fori_loop(0, st.c - 1, hop,
                                              ((dq, grads, d_mod), (k, v, kv_seg)))
    dq, grads, d_mod = visit(st.c - 1, (dq, grads, d_mod), block)
    grads = _rotate(st, grads)  # the last hop brings each block's dK/dV home
    if st.head_axis is not None and not st.kv_split:  # MQA: each head shard's share of dK/dV
        grads = jax.tree.map(lambda x: lax.psum(x, st.head_axis), grads)
    # The modifier's parameters are replicated: sum every shard's share (rows, heads, chunks).
    d_mod = jax.tree.map(lambda x: lax.psum(x, (st.axis,) + st.other_axes), d_mod)
    dq = jnp.concatenate(dq, axis=1).astype(q.dtype)
    return dq, grads[0].astype(k.dtype), grads[1].astype(v.dtype), d_mod


# ------------------------------------------------------------------------ the global function

def _specs(st: _Static):
    q_spec = PartitionSpec(st.batch_axes, st.axis, st.head_axis, None)
    kv_spec = PartitionSpec(st.batch_axes, st.axis, st.head_axis if st.kv_split else None,
                            None)
    seg = PartitionSpec(st.batch_axes, st.axis)
    rows = PartitionSpec(st.batch_axes)
    return q_spec, kv_spec, seg, rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(st, mesh, q, k, v, q_seg, kv_seg, kv_len, score_mod):
    """``(o [B,T,N,H], lse [B,T,N] fp32)``, both differentiable (a sink merges into lse)."""
    return _ring_fwd(st, mesh, q, k, v, q_seg, kv_seg, kv_len, score_mod)[0]


def _mapped(st, mesh, fn, in_tail, out_specs, *args):
    q_spec, kv_spec, seg, rows = _specs(st)
    seg_spec = None if args[3] is None else seg
    len_spec = None if args[5] is None else rows
    in_specs = (q_spec, kv_spec, kv_spec, seg_spec, seg_spec, len_spec, PartitionSpec()) \
        + in_tail
    return per_shard.shard_map(functools.partial(fn, st), mesh, in_specs=in_specs,
                               out_specs=out_specs)(*args)


def _ring_fwd(st, mesh, q, k, v, q_seg, kv_seg, kv_len, score_mod):
    q_spec = _specs(st)[0]
    o, lse = _mapped(st, mesh, _forward_local, (), (q_spec, PartitionSpec(*q_spec[:3])),
                     q, k, v, q_seg, kv_seg, kv_len, score_mod)
    return (o, lse), (q, k, v, q_seg, kv_seg, kv_len, score_mod, o, lse)


def _ring_bwd(st, mesh, res, cotangents):
    q, k, v, q_seg, kv_seg, kv_len, score_mod, o, lse = res
    do, dlse = cotangents
    q_spec, kv_spec, _, _ = _specs(st)
    lse_spec = PartitionSpec(*q_spec[:3])
    dq, dk, dv, d_mod = _mapped(st, mesh, _backward_local,
                                (q_spec, lse_spec, q_spec, lse_spec),
                                (q_spec, kv_spec, kv_spec, PartitionSpec()),
                                q, k, v, q_seg, kv_seg, kv_len, score_mod, o, lse, do,
                                dlse.astype(jnp.float32))
    return dq, dk, dv, None, None, None, d_mod


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: jax.sharding.Mesh,
                   mask: masks_lib.Mask | None = None, segment_ids=None, kv_lengths=None,
                   scale: float | None = None, score_mod=None, layout: str = "auto",
                   axis: str = AXIS, batch_axes=None, head_axis=None,
                   permuted: bool = False, implementation=()) -> jax.Array:
    """Attention of q ``[B,T,N,H]`` over k/v ``[B,S,K,H]`` (tokens in natural order), the
    sequence split over ``mesh``'s ``axis`` and computed as a ring; the arguments of
    ``kernels.reference.attention`` otherwise (positions are the default aligned ones).

    ``batch_axes`` / ``head_axis`` name the mesh axes that split rows and heads (GQA groups
    stay whole per shard; a single K/V head is replicated). ``permuted``: the tokens already
    lie in the layout's order (``token_order``), and so does the output.
    """
    mask = masks_lib.Full() if mask is None else mask
    _, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    c = mesh.shape[axis]
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}.")
    check_length("q_len (T)", t, c)
    check_length("kv_len (S)", s, c)
    if n % kh:
        raise ValueError(f"num_heads={n} must be divisible by num_kv_heads={kh}.")
    score_mod = check_score_mod(score_mod, n)
    if layout == "auto":
        layout = choose_layout(mask, c, t, s)
    table = visits(mask, layout, c, t, s)
    kinds, local = blocks.local_masks(mask, chunk_ids(layout, c), table, t, s)
    st = _Static(mask=mask, scale=h ** -0.5 if scale is None else float(scale), c=c, t=t, s=s,
                 num_heads=n, layout=layout, table=_Table(table), kinds=_Table(kinds),
                 local=local, implementation=registry.check(implementation), axis=axis,
                 other_axes=_split_axes(batch_axes, head_axis),
                 batch_axes=batch_axes, head_axis=head_axis, kv_split=kh != 1)
    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    if not permuted:
        q_order, kv_order = token_order(layout, c, t), token_order(layout, c, s)
        q, k, v = q[:, q_order], k[:, kv_order], v[:, kv_order]
        if q_seg is not None:
            q_seg, kv_seg = q_seg[:, q_order], kv_seg[:, kv_order]
    sinks = None if score_mod is None else score_mod.sink()
    if isinstance(score_mod, score_mods.Sinks):  # nothing left inside the blocks
        score_mod = None
    out, lse = _ring(st, mesh, q, k, v, q_seg, kv_seg, kv_lengths, score_mod)
    if sinks is not None:
        out = _merge_sinks(out, lse, sinks)
    if not permuted:
        out = out[:, np.argsort(q_order)]
    return out


def _split_axes(batch_axes, head_axis) -> tuple:
    """The mesh axes that split rows or heads: a replicated parameter's gradient is the sum
    of its shards' (an axis that splits neither holds copies of the same sum)."""
    axes = () if batch_axes is None else \
        ((batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
    return axes + (() if head_axis is None else (head_axis,))


class _Table:
    """A numpy table, hashable by value (a static argument of the traced ring)."""

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table)
        self._key = (self.table.shape, self.table.dtype.str, self.table.tobytes())

    def __array__(self, dtype=None, copy=None):
        return self.table if dtype is None else self.table.astype(dtype)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Table) and self._key == other._key
