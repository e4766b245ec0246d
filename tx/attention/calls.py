"""Typed call records: what an attention backend is asked to compute, one record per path.

A backend (``tx.attention.backends.Backend``) has one optional method per path, each taking
one of these records; it returns the output or declines with a reason
(``Decline``). Records are plain frozen dataclasses of arrays and static values, built by the
caches and layers in ``tx.attention`` (shapes in the project's alphabet: ``B`` batch, ``T``
query length, ``S`` key length, ``N`` query heads, ``K`` kv heads, ``H`` head dim, ``P``
pages, ``L`` page size, ``F`` features).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Dense:
    """Softmax attention over this call's keys (training, encoders, prefill, and the general
    form of every cache): ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]`` (``Hv``
    may differ from ``H``: MLA's expanded form) -> ``[B, T, N, Hv]``.

    ``q_positions [B, T]`` / ``kv_positions [B, S]`` (None: bottom-right aligned, -1: an empty
    slot) are where ``mask`` and ``score_mod`` are evaluated; ``bias [B, N, T, S]`` a dense
    logits bias (positions that have no score modifier)."""

    q: Any
    k: Any
    v: Any
    mask: Any = None
    segment_ids: Any = None  # (q_ids [B, T], kv_ids [B, S]); equal ids attend
    kv_lengths: Any = None  # [B] valid keys per row
    scale: float | None = None
    bias: Any = None
    q_positions: Any = None
    kv_positions: Any = None
    score_mod: Any = None

    def kwargs(self) -> dict:
        """The keyword arguments of ``kernels.reference.attention``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("q", "k", "v")}


@dataclasses.dataclass(frozen=True)
class Cached:
    """New queries ``q [B, T, N, H]`` over a contiguous cache ``k, v [B, S, K, H]`` whose first
    ``lengths [B]`` slots are written, the new queries the last ``T`` of them (positions
    ``lengths - T .. lengths - 1``).

    ``value_dim``: when set, ``v`` is None and the values are the first ``value_dim`` columns
    of the keys (``k[..., :value_dim]``; MLA's latent cache stores ``[c_kv, k_rope]`` once per
    token); the output is ``[B, T, N, value_dim]``."""

    q: Any
    k: Any
    v: Any
    lengths: Any
    mask: Any = None
    scale: float | None = None
    score_mod: Any = None
    value_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class Paged:
    """New queries ``q [B, T, N, H]`` over a paged cache: ``k_pages, v_pages [K, P, L, H]``
    (int8 codes with ``k_scales, v_scales [K, P, L]``, or the compute dtype), sequence ``b``'s
    logical page ``j`` at physical page ``block_tables[b, j]``, ``lengths [B]`` tokens stored,
    the new ones included.

    ``value_dim``: when set, ``v_pages`` and ``v_scales`` are None and the values are the
    first ``value_dim`` columns of the key pages (int8 codes scaled by ``k_scales``); the
    output is ``[B, T, N, value_dim]`` (MLA's latent pages, stored once per token)."""

    q: Any
    k_pages: Any
    v_pages: Any
    block_tables: Any
    lengths: Any
    mask: Any = None
    scale: float | None = None
    score_mod: Any = None
    k_scales: Any = None
    v_scales: Any = None
    value_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class PagedWrite:
    """Stores ``k_new, v_new [B, T, K, H]`` into fp32 pools ``k_pages, v_pages [K, P, L, H]``
    at positions ``lengths - T ..`` and attends, in one call; returns ``(out, k_pages,
    v_pages)``."""

    q: Any
    k_new: Any
    v_new: Any
    k_pages: Any
    v_pages: Any
    block_tables: Any
    lengths: Any
    mask: Any = None
    scale: float | None = None
    score_mod: Any = None


@dataclasses.dataclass(frozen=True)
class Linear:
    """Linear (feature-map) attention of ``q_f [B, T, N, F]``, ``k_f [B, S, K, F]`` and
    ``v [B, S, K, H]``: causal (a prefix sum, chunk by chunk) or bidirectional."""

    q_f: Any
    k_f: Any
    v: Any
    causal: bool
    chunk: int
    segment_ids: Any = None  # [B, T]: equal ids attend (self-attention)
    kv_lengths: Any = None


@dataclasses.dataclass(frozen=True)
class Gated:
    """A decay-gated linear recurrence (``kernels.gated_reference``) of ``q [B, T, N, Dk]``,
    ``k [B, T, K, Dk]``, ``v [B, T, K, Dv]`` with ``log_decay [B, T, K]`` or ``[B, T, K, Dk]``
    (<= 0); with ``beta [B, T, K]`` the gated delta rule. Causal, chunk by chunk."""

    q: Any
    k: Any
    v: Any
    log_decay: Any
    chunk: int
    segment_ids: Any = None  # [B, T]: each document starts from a zero state
    kv_lengths: Any = None
    beta: Any = None


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of ring attention (``tx.parallel.ring``): ``q [B, T, N, H]`` over ``k, v
    [B, S, K, H]`` returning ``(o [B, T, N, H] fp32, lse [B, T, N] fp32)``, -1e30 for a row
    that sees nothing, both differentiable. ``q_positions [T]`` / ``kv_positions [S]`` are the
    chunks' global positions in a sequence of ``seq_len`` keys, where ``mask``,
    ``kv_lengths [B]`` and ``score_mod`` (at global heads ``head0 + n`` of ``num_heads``,
    rows ``batch0 + b``) apply; ``local_mask`` is the same mask at the block's own aligned
    positions, or None where it has no such form (``tx.parallel.blocks``)."""

    q: Any
    k: Any
    v: Any
    q_positions: Any
    kv_positions: Any
    seq_len: int
    scale: float
    mask: Any = None
    local_mask: Any = None
    segment_ids: Any = None
    kv_lengths: Any = None
    score_mod: Any = None
    head0: Any = 0
    batch0: Any = 0
    num_heads: int = 0


PATHS = {"dense": Dense, "cached": Cached, "paged": Paged, "paged_write": PagedWrite,
         "linear": Linear, "gated": Gated, "block": Block}
