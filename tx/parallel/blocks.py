"""One block of ring attention, through the device's backend: attention of a query chunk
over a key chunk that also returns each row's log-sum-exp, so the ring can merge blocks
(``tx.parallel.ring``). The call record is ``tx.attention.calls.Block``; the ``xla``
backend serves it with :func:`reference` (``jnp`` einsums at the chunks' global positions,
every case) and the ``pallas`` backend with :func:`flash` (the flash kernel, which computes
the lse anyway; its backward takes the lse's cotangent, ``kernels.flash_lse``).

A kernel evaluates masks at its own, bottom-right aligned positions, so the ring hands it
the block's mask in local coordinates (``Block.local_mask``): ``Full()`` for a chunk pair
the mask shows whole, and for a banded mask (causal, sliding window) the same band shifted
by the chunks' offset (:class:`Band`). A pair of a non-banded mask (BigBird, strided) that
is only partly visible has no local form, and neither has a position-dependent score
modifier: those blocks are served by ``xla``. :func:`local_masks` is the host-side plan:
the few distinct local masks of a ring and which one each (device, step, chunk pair) uses.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from tx.kernels import block_sizes as block_sizes_lib
from tx.kernels import masks as masks_lib
from tx.kernels import score_mods
from tx.kernels.common import SUPPORTED_DTYPES

NEG = -1e30  # the log-sum-exp of a row that sees no key: finite, so merges stay NaN-free


@dataclasses.dataclass(frozen=True)
class Band(masks_lib.Mask):
    """``lo <= kv_pos - q_pos <= hi`` with any integer bounds (either may be infinite): a
    banded mask seen from a block whose keys sit ``e`` positions after its queries' diagonal
    is the band shifted by ``-e``, which ``Local`` (bounds around the diagonal) cannot say."""

    lo: float
    hi: float

    def predicate(self, q_pos, kv_pos, kv_len):
        d = kv_pos - q_pos
        keep = (d >= d) if math.isinf(self.lo) else (d >= int(self.lo))
        return keep if math.isinf(self.hi) else keep & (d <= int(self.hi))

    def band(self):
        return (self.lo, self.hi)


def local_masks(mask: masks_lib.Mask, ids: np.ndarray, table: np.ndarray, t: int, s: int):
    """``(kinds [c, c, 2, 2] int32, masks)``: the local mask (an index into ``masks``, a tuple
    of ``Mask`` or None) of every visited chunk pair. ``ids [c, 2]`` are the chunks each
    device holds, ``table`` the ring's visits (``ring.visits``)."""
    c = ids.shape[0]
    tc, sc = t // (2 * c), s // (2 * c)
    tiles = mask.tile_map(t, s, tc, sc)
    band = mask.band()
    kinds, found = np.zeros(table.shape, np.int32), {}
    for d, j, a, b in zip(*np.nonzero(table)):
        qc, kc = ids[d, a], ids[(d - j) % c, b]
        if tiles[qc, kc] == masks_lib.FULL:
            local = masks_lib.Full()
        elif band is not None:
            # Global kv - q at local (i, j) is j - (i + sc - tc) + e: the band moves by -e.
            e = kc * sc - (qc * tc + s - t) + (sc - tc)
            local = Band(band[0] - e, band[1] - e)
        else:
            local = None
        kinds[d, j, a, b] = found.setdefault(local, len(found))
    return kinds, tuple(found) or (None,)


# ----------------------------------------------------------------------------- xla: jnp

def reference(call):
    """``(o [B,t,N,H] fp32, lse [B,t,N] fp32)`` of one block at its global positions."""
    q, k, v = call.q, call.k, call.v
    b, tq, n, h = q.shape
    kh, sk = k.shape[2], k.shape[1]
    g = n // kh
    q_pos, kv_pos = call.q_positions, call.kv_positions
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(b, tq, kh, g, h), k,
                        preferred_element_type=jnp.float32) * call.scale
    if call.score_mod is not None:
        head = call.head0 + jnp.arange(n, dtype=jnp.int32).reshape(1, kh, g, 1, 1)
        batch = call.batch0 + jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1, 1)
        logits = score_mods.reference_logits(
            call.score_mod, logits, head=head, batch=batch,
            q_pos=q_pos.astype(jnp.int32)[None, None, None, :, None],
            kv_pos=kv_pos.astype(jnp.int32)[None, None, None, None, :],
            num_heads=call.num_heads)
    mask = masks_lib.Full() if call.mask is None else call.mask
    visible = jnp.broadcast_to(mask.predicate(q_pos[:, None], kv_pos[None, :], call.seq_len),
                               (tq, sk))[None]                              # [1|B, t, s]
    if call.segment_ids is not None:
        q_seg, kv_seg = call.segment_ids
        visible = visible & (q_seg[:, :, None] == kv_seg[:, None, :])
    if call.kv_lengths is not None:
        visible = visible & (kv_pos[None, None, :] < call.kv_lengths[:, None, None])
    visible = jnp.broadcast_to(visible, (b, tq, sk))[:, None, None]          # [B,1,1,t,s]
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
    m = lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    p = jnp.where(visible, jnp.exp(logits - m), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", (p / l_safe).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    lse = jnp.where(seen, m + jnp.log(l_safe), NEG)[..., 0]                 # [B,K,G,t]
    return o.reshape(b, tq, n, -1), jnp.moveaxis(lse.reshape(b, n, tq), 1, 2)  # v: its own H


# ------------------------------------------------------------------------- pallas: flash

def flash(call):
    """The block through the flash kernel (``return_lse``); raises ``NotImplementedError``
    (the backend's decline) for what the kernel cannot express at local positions."""
    from tx.kernels.flash_attention import flash_attention  # noqa: PLC0415 (backends import us)

    if call.local_mask is None:
        raise NotImplementedError(f"{call.mask} is not banded and this chunk pair is partly "
                                  "visible: no local mask for the kernel")
    if call.score_mod is not None:
        raise NotImplementedError("a score modifier is evaluated at global positions and "
                                  "heads, which the kernel does not take")
    q = call.q
    if q.dtype not in SUPPORTED_DTYPES or q.shape[-1] > block_sizes_lib.MAX_HEAD_DIM:
        raise NotImplementedError(f"dtype {q.dtype} / head_dim {q.shape[-1]} unsupported")
    kv_lengths = call.kv_lengths
    if kv_lengths is not None:  # the keys before the row's length, counted in this chunk
        kv_lengths = jnp.clip(kv_lengths - call.kv_positions[0], 0, call.k.shape[1])
        kv_lengths = kv_lengths.astype(jnp.int32)
    o, lse = flash_attention(q, call.k, call.v, mask=call.local_mask,
                             segment_ids=call.segment_ids, kv_lengths=kv_lengths,
                             scale=call.scale, return_lse=True)
    return o.astype(jnp.float32), lse
