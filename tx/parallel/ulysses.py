"""All-to-all ("Ulysses") context parallelism (Jacobs et al., "DeepSpeed Ulysses", 2023).

Each of the ``c`` devices of the ``context`` axis holds ``T / c`` tokens of every head. One
``all_to_all`` per tensor trades that for all ``T`` tokens of ``N / c`` heads; attention is
then an ordinary whole-sequence call on each device, served by the device's backend
(``tx.attention.registry.serve``: the Pallas flash kernel on a GPU, the ``cpu`` kernel or
``xla`` on a CPU), and one more ``all_to_all`` returns the output to the sequence split.
Communication per device and layer is ``4 (c - 1) / c`` of its q/k/v/o shards (for MHA),
independent of the mask; the query heads and the K/V heads must divide by ``c`` (a single
K/V head, MQA, is gathered whole instead).

Autodiff needs no help: the transpose of an ``all_to_all`` is the reverse ``all_to_all``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from tx.attention import calls, registry
from tx.kernels import masks as masks_lib
from tx.kernels import score_mods
from tx.parallel import per_shard
from tx.parallel import shard as shard_lib

AXIS = "context"


@dataclasses.dataclass(frozen=True)
class HeadOffset(score_mods.ScoreMod):
    """``inner`` on a device that holds ``local_heads`` of the ``num_heads`` heads, from head
    ``offset`` (traced: it depends on the device). A backend numbers heads from 0; this
    hands it the local rows of every per-head parameter (ALiBi slopes, T5 tables, sinks) and,
    to a modifier that reads its head index (``ScoreFn``), the global one. Inside a kernel
    the modifier's leaves are gone (only the parameter table travels), so the global head
    index travels as one more parameter column."""

    inner: Any
    offset: Any
    num_heads: int
    local_heads: int
    data_fields = ("inner", "offset")

    @property
    def width(self):
        return self.inner.width + 1

    @property
    def relative(self):
        return self.inner.relative

    def _rows(self, x):  # [num_heads, ...] -> this device's [local_heads, ...]
        return lax.dynamic_slice_in_dim(x, self.offset, self.local_heads, axis=0)

    def head_params(self, num_heads):
        own = self._rows(self.inner.head_params(self.num_heads))
        head = self.offset + jnp.arange(self.local_heads, dtype=jnp.int32)
        head = lax.stop_gradient(head.astype(jnp.float32))[:, None]
        return jnp.concatenate([own, head], axis=1)

    def modify(self, s, ctx):
        head = ctx.param(self.inner.width).astype(jnp.int32)  # the global head index
        if ctx.in_kernel:  # the table is per tile row already
            return self.inner.modify(s, dataclasses.replace(ctx, head=head))
        # The reference indexes the table by head: give it the global table.
        return self.inner.modify(s, dataclasses.replace(
            ctx, head=head, params=self.inner.head_params(self.num_heads)))

    def sink(self):
        sinks = self.inner.sink()
        return None if sinks is None else self._rows(sinks)

    def tables(self):
        return self.inner.tables()


def check_heads(num_heads: int, num_kv_heads: int, context: int) -> None:
    """Refuses head counts the all-to-all cannot split, before anything is traced."""
    if num_heads % context:
        raise ValueError(
            f"mesh.context_attention='all_to_all' splits heads over mesh.context={context}, "
            f"which must divide num_heads={num_heads} (per tensor shard); use "
            "mesh.context_attention='ring', or a context size that divides the heads.")
    if num_kv_heads % context and num_kv_heads != 1:
        raise ValueError(
            f"mesh.context_attention='all_to_all' splits K/V heads over mesh.context="
            f"{context}, which must divide num_kv_heads={num_kv_heads} (or use one K/V head, "
            "MQA); use mesh.context_attention='ring' instead.")


def all_to_all_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         mesh: jax.sharding.Mesh, mask: masks_lib.Mask | None = None,
                         segment_ids=None, kv_lengths=None, scale: float | None = None,
                         score_mod=None, implementation=(), axis: str = AXIS,
                         batch_axes=None, head_axis=None) -> jax.Array:
    """Attention of q ``[B,T,N,H]`` over k/v ``[B,S,K,H]`` with the sequence split over
    ``mesh``'s ``axis`` (contiguous chunks, natural order); the arguments of
    ``kernels.reference.attention`` otherwise (default aligned positions)."""
    c = mesh.shape[axis]
    t_shards = 1 if head_axis is None else mesh.shape[head_axis]
    n, kh = q.shape[2] // t_shards, k.shape[2] // t_shards if k.shape[2] != 1 else 1
    check_heads(n, kh, c)
    n_all = q.shape[2]
    for name, length in (("q_len (T)", q.shape[1]), ("kv_len (S)", k.shape[1])):
        if length % c:
            raise ValueError(f"{name}={length} must be divisible by mesh.context={c}; pad "
                             "the sequence to a multiple of it.")
    score_mod = score_mods.check(score_mod, q.shape[2])
    if score_mod is not None and any(x is not None for x in score_mod.tables()):
        raise ValueError(f"score_mod={type(score_mod).__name__} holds row/column tables "
                         "(DeBERTa's) of the whole sequence, which the all-to-all does not "
                         "reshard; use mesh.context_attention='ring'.")
    gather_kv = kh == 1 and c > 1  # MQA: every head group needs the one K/V head
    q_spec = PartitionSpec(batch_axes, axis, head_axis, None)
    kv_spec = PartitionSpec(batch_axes, axis, None if k.shape[2] == 1 else head_axis, None)
    seg_spec = PartitionSpec(batch_axes, axis)

    def local(q, k, v, q_seg, kv_seg, kv_len, score_mod):
        def to_heads(x):  # [B, T/c, N, H] -> [B, T, N/c, H]
            return lax.all_to_all(x, axis, 2, 1, tiled=True)

        q = to_heads(q)
        if gather_kv:
            k, v = (lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
        else:
            k, v = to_heads(k), to_heads(v)
        segments = None if q_seg is None else tuple(
            lax.all_gather(x, axis, axis=1, tiled=True) for x in (q_seg, kv_seg))
        if score_mod is not None:  # this device's heads: (tensor shard, context slice)
            offset = lax.axis_index(axis) * q.shape[2]
            if head_axis is not None:
                offset = offset + lax.axis_index(head_axis) * q.shape[2] * c
            score_mod = HeadOffset(score_mod, offset.astype(jnp.int32), n_all, q.shape[2])
        call = calls.Dense(q, k, v, mask=mask, segment_ids=segments, kv_lengths=kv_len,
                           scale=scale, score_mod=score_mod)
        with shard_lib.use(None):  # already per shard: backends must not wrap it again
            out = registry.serve("dense", call, implementation)
        return lax.all_to_all(out, axis, 1, 2, tiled=True)  # back to the sequence split

    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    specs = (q_spec, kv_spec, kv_spec, None if q_seg is None else seg_spec,
             None if kv_seg is None else seg_spec,
             None if kv_lengths is None else PartitionSpec(batch_axes),
             None if score_mod is None else PartitionSpec())
    return per_shard.shard_map(local, mesh, in_specs=specs, out_specs=q_spec)(
        q, k, v, q_seg, kv_seg, kv_lengths, score_mod)


def collective_bytes(b: int, t: int, n: int, kh: int, h: int, c: int, itemsize: int = 4,
                     backward: bool = False) -> int:
    """Bytes one device sends per attention call (the formula the benchmark checks against
    the compiled HLO): each all-to-all keeps ``1/c`` of a shard and sends the rest."""
    shard = b * (t // c) * h * itemsize
    sent = shard * (n + (kh if kh != 1 else 0) * 2 + n) * (c - 1) // c
    if kh == 1:  # MQA: K and V gathered whole instead
        sent += 2 * shard * (c - 1)
    return 2 * sent if backward else sent
