"""The logits of one flash-attention tile, shared by the forward, dq and dk/dv kernels.

Base-2 logits (the kernels' softmax runs in base 2: ``exp(x) = exp2(x * log2(e))``) of a q tile
against a key tile, with the call's score modifier (``kernels.score_mods``) applied in natural
units, the pullback of the modifier for the backward kernels, and the running max and sum a
row starts from (a sink's logit already counted). ``cfg`` is the kernel's static config
(``kernels.flash_kernels.Config``).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tx.kernels import score_mods
from tx.kernels.online_softmax import LOG2E, dot


def program_ids():
    """``(batch, head group)`` of this program, read at the kernel's top level: the
    interpreter cannot evaluate ``program_id`` inside a ``jax.vjp``."""
    return pl.program_id(0), pl.program_id(1)


def modify(cfg, s, params, ids, q_block, kv_start, tables=(None, None)):
    """The score modifier on natural-unit logits ``s [rows, cols]`` of a tile: row ``r`` is
    head ``head_group * fold + r % fold`` at position ``q_block * rows / fold + r // fold``;
    ``tables`` the tile's row/column table blocks (``kernels.row_tables``)."""
    (rows, cols), (batch, head_group) = s.shape, ids
    row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    t_idx = q_block * (rows // cfg.fold) + row // cfg.fold
    ctx = score_mods.Context(
        batch=batch, head=head_group * cfg.fold + row % cfg.fold,
        q_pos=t_idx + (cfg.kv_len - cfg.q_len),
        kv_pos=kv_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1), params=params,
        in_kernel=True, rows=tables[0], cols=tables[1])
    return score_mods.rebuild(cfg.mod).modify(s, ctx)


def logits(cfg, q, k, params, ids, q_block, kv_start, precision, tables=(None, None)):
    """Base-2 logits ``[rows, cols]`` of a tile, modified when the call has a modifier."""
    if any(t is not None for t in tables):
        # Traced through vjp (the pullback unused) so the table lookups' custom_vjp becomes
        # plain ops: Triton has no lowering for a custom_vjp call.
        return logits_vjp(cfg, q, k, params, ids, q_block, kv_start, precision, tables)[0]
    s = dot(q, k, (1, 1), precision)
    if cfg.mod is None:
        return s * (cfg.scale * LOG2E)  # softmax in base 2: exp(x) = exp2(x * log2(e))
    return modify(cfg, s * cfg.scale, params, ids, q_block, kv_start, tables) * LOG2E


def logits_vjp(cfg, q, k, params, ids, q_block, kv_start, precision, tables=(None, None)):
    """Base-2 logits of a tile and the pullback of natural-unit cotangents through the
    modifier: ``ds -> (ds_raw, dparams)`` (``dparams`` None without parameters), or with
    row/column tables ``ds -> (ds_raw, dparams, (drows, dcols))``."""
    if any(t is not None for t in tables):
        s = dot(q, k, (1, 1), precision) * cfg.scale
        s_mod, pull = jax.vjp(
            lambda x, p, t: modify(cfg, x, p, ids, q_block, kv_start, t), s, params, tables)
        return s_mod * LOG2E, pull
    if cfg.mod is None:
        s = logits(cfg, q, k, None, ids, q_block, kv_start, precision)
        return s, lambda ds: (ds, None)
    s = dot(q, k, (1, 1), precision) * cfg.scale
    if params is None:
        s_mod, pull = jax.vjp(lambda x: modify(cfg, x, None, ids, q_block, kv_start), s)
        return s_mod * LOG2E, lambda ds: (pull(ds)[0], None)
    s_mod, pull = jax.vjp(lambda x, p: modify(cfg, x, p, ids, q_block, kv_start), s, params)
    return s_mod * LOG2E, pull


def initial_max(cfg, sinks_ref, rows):
    """The running max and sum a row starts from: ``(-inf, 0)``, or the sink's logit with its
    weight ``exp2(0) = 1`` already counted."""
    if sinks_ref is None:
        return jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32)
    return sinks_ref[...] * LOG2E, jnp.ones((rows,), jnp.float32)
