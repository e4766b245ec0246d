"""One conformance suite for every attention backend and every path it offers.

A backend (``tx.attention.Backend``) is held to the suite by subclassing :class:`BackendSuite`
in a ``Test*`` class of its own test file; pytest then runs, for each path the backend offers
(``backend.paths()``: dense, cached, paged, paged_write, linear), that path's cases::

    import tx.testing
    from my_research import Mine
    class TestMine(tx.testing.BackendSuite):
        backend = Mine()              # or a registered name: backend = "mine"
        must_serve = ("dense",)       # declining a core dense case fails, not skips

Each case runs the backend on inputs rounded to the case's dtype and the reference
(``kernels.reference``) in fp32 on the same rounded inputs, so the error measured is the
backend's, within the one table ``TOLERANCE[path][dtype]``. Tests run under strict dtype
promotion: a silent float32/bfloat16 mix inside a backend is an error here. The paths:

* ``dense``: every mask of ``CATALOGUE`` (each kind in ``kernels.masks``, both compositions
  and :class:`Dilated`, a user's mask class), each modifier of ``MODIFIERS`` (ALiBi, T5
  buckets, soft-capping, sinks and :class:`HeadScale`, a user's modifier with per-head
  parameters; DeBERTa's row/column tables, ``kernels.row_tables``, in a case of its own),
  G = N / K of 1, 2 and 4, fp32 and bf16, T = S, T < S, T > S and a length past one kernel
  tile, packed documents and ragged key lengths; a few cases with values of their own head
  dim (``UNEQUAL_HEAD_DIMS``, MLA's expanded form). Rows that see no key give zeros
  (not NaN) and zero gradients; gradients of q, k, v and of the modifier's parameters.
* ``cached``: 1 and 3 new queries at the end of each row's ``lengths`` of a contiguous cache,
  against ``reference.attention`` at the cache's positions.
* ``paged``: shuffled block tables, pages of 4 and 16 tokens, float pages or
  int8 pages with scales, against ``reference.paged_attention`` on the same pages.
* ``paged_write``: the returned pools hold the new tokens at their slots and nothing else
  changed; the output is the reference's over the written pools.
* ``linear``: causal and bidirectional, packed documents, key lengths, gradients, against
  ``reference.linear_attention``.
* ``gated``: decay-gated recurrences (a decay per head, per key channel, and the gated delta
  rule), GQA, packed documents, key lengths with an empty row, chunks that do or do not divide
  T, decays near 0 and 1; gradients of q, k, v, the log decay and beta, against the step-by-step
  recurrences of ``kernels.gated_reference``.

Caches are poisoned: pages no row owns hold NaN (the table entries past a row's pages name
them), and slots past a row's length hold NaN keys and ``GARBAGE`` values, so a stray read
shows. Cases are few but covering: each path's factors (mask, modifier, G, dtype, lengths,
...) are combined pairwise (:func:`pairwise`: every pair of values of any two factors meets
in some case), not as their product, on a handful of shapes so compiles repeat.

A backend declines a case by raising ``tx.attention.Decline`` (any ``NotImplementedError``).
The test then skips with the reason, after checking the case without the optional features
it can drop (the modifier, a bias, int8 pages: a backend declining modifiers is still held to
every mask, G, dtype and length). It fails instead when the backend must serve the case: its
path is in ``must_serve`` and each optional feature (``OPTIONAL``) it uses is in
``must_serve_optional``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import zlib
from typing import Any, Callable, ClassVar, NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import gated_reference
from tx.kernels import masks
from tx.kernels import reference
from tx.kernels import row_tables, score_mods
from tx.attention import calls

# --- the mask catalogue --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dilated(masks.Mask):
    """A user's mask, known to no kernel: a two-sided window of ``window`` positions keeping
    every ``rate``-th distance (the diagonal included). It has no band, so a kernel can only
    evaluate its predicate (tile maps, page bounds)."""

    rate: int = 2
    window: int = 6

    def predicate(self, q_pos, kv_pos, kv_len):
        d = abs(q_pos - kv_pos)
        return (d <= self.window) & (d % self.rate == 0)


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
    "dilated": Dilated(2, 6),                                  # a user's mask class
    "segment_memory": masks.SegmentMemory(5, 3),               # Transformer-XL, no band
}
# The masks a cache decodes with (positions from the cache; BigBird's blocks depend on a key
# length a cache does not fix, and global tokens are a prefill pattern).
CACHE_MASKS = ("full", "causal", "local", "strided_and_local", "dilated")
CACHED_MASKS = CACHE_MASKS[1:]  # over a contiguous cache, full is causal at T = 1


# --- score modifiers -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class HeadScale(score_mods.ScoreMod):
    """A user's learned modifier, known to no kernel: ``s * params[n, 0] - params[n, 1] *
    log1p|q_pos - kv_pos|``, parameters ``[N, 2]`` per query head."""

    params: Any  # [N, 2]
    width = 2
    data_fields = ("params",)

    def modify(self, s, ctx):
        distance = jnp.abs(ctx.q_pos - ctx.kv_pos).astype(jnp.float32)
        return s * ctx.param(0) - ctx.param(1) * jnp.log1p(distance)

    def head_params(self, num_heads):
        return jnp.asarray(self.params, jnp.float32).reshape(num_heads, 2)

    def check(self, num_heads):
        if tuple(np.shape(self.params)) != (num_heads, 2):
            raise ValueError(f"HeadScale.params.shape={np.shape(self.params)} must be "
                             f"[N, 2] = [{num_heads}, 2].")


if isinstance(jax.tree_util.tree_leaves(HeadScale(np.zeros((1, 2))))[0], HeadScale):
    # Where ScoreMod subclasses are not pytrees by themselves, a kernel would rebuild a leaf
    # (None) in place of the modifier.
    jax.tree_util.register_dataclass(HeadScale, data_fields=["params"], meta_fields=[])


# The suite's modifiers by case name: ``(num_heads, normal) -> ScoreMod | None``, ``normal``
# drawing fp32 parameters from the case's seed.
_MODIFIERS: dict[str, Callable] = {
    "none": lambda n, normal: None,
    "alibi": lambda n, normal: score_mods.ALiBi(
        jnp.asarray(score_mods.alibi_slopes(n), jnp.float32)),
    "t5": lambda n, normal: score_mods.T5Bias(normal(8, n), num_buckets=8, max_distance=20,
                                              bidirectional=True),
    # small enough to bend the logits of unit-normal q . k
    "softcap": lambda n, normal: score_mods.SoftCap(2.0),
    "sinks": lambda n, normal: score_mods.Sinks(normal(n)),
    "head_scale": lambda n, normal: HeadScale(1.0 + normal(n, 2, scale=0.3)),
}
MODIFIERS = tuple(_MODIFIERS)
# Modifiers with data per query row and key column, sized by the case ``(n, normal, b, t, s)``:
# dense self-attention only (T == S), so they join hand-written dense cases, not the pairs.
_TABLE_MODIFIERS: dict[str, Callable] = {
    "disentangled": lambda n, normal, b, t, s: row_tables.Disentangled(
        normal(b, t, n, 16, scale=0.5), normal(b, s, n, 16, scale=0.5), position_buckets=8,
        max_relative_positions=20, content_scale=3 ** -0.5),
}


def _modifier(name: str, n: int, seed: int, case=None) -> score_mods.ScoreMod | None:
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    if name in _TABLE_MODIFIERS:
        return _TABLE_MODIFIERS[name](n, normal, B, case.t, case.s)
    return _MODIFIERS[name](n, normal)


# --- pairwise coverage ---------------------------------------------------------------------------


def pairwise(factors: dict[str, Sequence]) -> list[dict[str, Any]]:
    """Rows (one value per factor) in which every pair of values of any two factors meets at
    least once: greedy, deterministic, about ``len(a) * len(b)`` rows for the two largest
    factors instead of the full product."""
    names = sorted(factors, key=lambda f: -len(factors[f]))  # largest first: fewer rows
    sizes = [len(factors[f]) for f in names]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    used = [[0] * n for n in sizes]
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for f in range(len(names)):
            if f in row:
                continue

            def gain(x, f=f, row=row):
                new = sum(((min(f, g), x if f < g else y, max(f, g), y if f < g else x)
                           in uncovered) for g, y in row.items())
                return (-new, used[f][x], x)
            row[f] = min(range(sizes[f]), key=gain)
        for f, x in row.items():
            used[f][x] += 1
        for f, g in itertools.combinations(sorted(row), 2):
            uncovered.discard((f, row[f], g, row[g]))
        rows.append({names[f]: factors[names[f]][x] for f, x in sorted(row.items())})
    return rows


def uncovered_pairs(factors: dict[str, Sequence], rows: Sequence[Any]) -> list[tuple]:
    """The pairs of factor values no row shows (rows as dicts or as case values)."""
    get = (lambda r, f: r[f]) if rows and isinstance(rows[0], dict) else getattr
    seen = {(f, get(r, f), g, get(r, g)) for r in rows
            for f, g in itertools.combinations(factors, 2)}
    return [(f, a, g, b) for f, g in itertools.combinations(factors, 2)
            for a in factors[f] for b in factors[g] if (f, a, g, b) not in seen]


# --- tolerances ----------------------------------------------------------------------------------

# (atol, rtol): an error must satisfy max|got - want| <= atol + rtol * max|want|. One row per
# path and dtype of the inputs ("int8": int8 pages with fp32 scales and fp32 queries; kernel
# and reference dequantise the same codes, so fp32 rounding is the whole error). No path needs
# more than fp32 rounding: the worst error over the suite's cases, in units of 1 + max|want|,
# is 7e-7 for fp32 (pallas dense gradients) and 1e-2 for bf16 (pallas dense gradients); the
# gated recurrences reach 1.7e-6 (fp32, per-channel decay) and 3.3e-3 (bf16).
_F32 = {"out": (1e-5, 1e-5), "grad": (1e-5, 1e-5)}
_BF16 = {"out": (2e-2, 2e-2), "grad": (2e-2, 2e-2)}
TOLERANCE: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "dense": {"float32": _F32, "bfloat16": _BF16},
    "cached": {"float32": _F32, "bfloat16": _BF16},
    "paged": {"float32": _F32, "bfloat16": _BF16, "int8": _F32},
    "paged_write": {"float32": _F32},
    "linear": {"float32": _F32, "bfloat16": _BF16},
    "gated": {"float32": _F32, "bfloat16": _BF16},
}

# Optional features: a case using one is core only for a backend that lists it in
# ``must_serve_optional``.
OPTIONAL = {
    "bias": "a dense fp32 logits bias",
    "score_mod": "a score modifier",
    "int8": "int8 pages with scales",
    "unbanded": "a mask that is no band, over a cache",
    "bidirectional": "bidirectional linear attention",
    "value_head_dim": "values of their own head dim (MLA's expanded form)",
}


def assert_close(name: str, got, want, tol: tuple[float, float]) -> float:
    """Asserts shape, finiteness and ``max|got - want| <= atol + rtol * max|want|``; returns
    the error."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values (a stray read of poison?)"
    atol, rtol = tol
    err = float(np.abs(got - want).max()) if got.size else 0.0
    bound = atol + rtol * (float(np.abs(want).max()) if want.size else 0.0)
    assert err <= bound, f"{name}: max |error| {err:.3g} > {bound:.3g}"
    return err


def _rng(case) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, tree)


def _np32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


# --- cases ---------------------------------------------------------------------------------------

N, B, H = 4, 2, 8  # query heads, batch rows, head dim of every case (G = N / K picks K)


class Case:
    """A path's case: a frozen dataclass of hashable factor values (its own cache key)."""

    path: ClassVar[str]
    mod: str = "none"
    gqa: int = 1

    @property
    def kh(self) -> int:
        return N // self.gqa

    @property
    def score_mod(self):
        return _modifier(self.mod, N, seed=3, case=self)

    def extras(self) -> frozenset[str]:
        """The optional features (``OPTIONAL``) this case uses."""
        return frozenset({"score_mod"} if self.mod != "none" else ())

    def core(self) -> "Case":
        """This case without the optional features that can be dropped (a modifier, a bias,
        int8 pages): what a backend declining them is still held to."""
        drop = {"mod": "none", "bias": False, "storage": "float32", "head_dims": None}
        return dataclasses.replace(self, **{f.name: drop[f.name] for f in dataclasses.fields(
            self) if f.name in drop})

    @property
    def id(self) -> str:
        """The test id: every factor's value ("none" and False left out)."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (value in ("none", False) and field.name != "causal") or value is None:
                continue
            if field.name == "causal":
                value = "causal" if value else "bidirectional"
            elif field.name == "bias":
                value = "bias"
            elif field.name == "head_dims":
                value = "h{}v{}".format(*value)
            else:
                value = _ID.get(field.name, "{}").format(_SHORT.get(value, value))
            parts.append(value)
        return "-".join(parts)


_ID = {"gqa": "g{}", "t": "t{}", "page": "page{}", "lengths": "{}_lengths",
       "chunk": "chunk{}"}
_SHORT = {"float32": "f32", "bfloat16": "bf16"}


def _documents(rng, b, s, p=0.3) -> np.ndarray:
    """Random packed documents ``[B, S]``: ids increase at random boundaries."""
    return np.cumsum(rng.random((b, s)) < p, axis=1).astype(np.int32)


_DENSE_SHAPES = {"13x13": (13, 13), "5x13": (5, 13), "13x5": (13, 5), "100x100": (100, 100)}


@dataclasses.dataclass(frozen=True)
class DenseCase(Case):
    """``calls.Dense``: q ``[2, T, 4, 8]``, k, v ``[2, S, 4 / gqa, 8]``.

    ``shape`` ``"TxS"`` (queries bottom-right aligned; 100 spans several kernel tiles, so
    banded masks skip some). ``data``: ``"none"``; ``"packed"`` random documents, queries
    taking the document of their position; ``"orphan"`` packed, and two queries of row 0 in a
    document no key belongs to; ``"ragged"`` key lengths; ``"empty"`` row 1 has no key.
    """

    path: ClassVar[str] = "dense"
    mask: str = "causal"
    mod: str = "none"
    gqa: int = 1
    dtype: str = "float32"
    shape: str = "13x13"
    data: str = "none"
    bias: bool = False
    # ``(H, Hv)``: q/k heads H wide and values Hv wide (MLA's expanded form); None: both H.
    # Left out of the repr, so the equal-dims cases keep their seeds.
    head_dims: tuple[int, int] | None = dataclasses.field(default=None, repr=False)

    @property
    def t(self) -> int:
        return _DENSE_SHAPES[self.shape][0]

    @property
    def dims(self) -> tuple[int, int]:
        return self.head_dims or (H, H)

    @property
    def s(self) -> int:
        return _DENSE_SHAPES[self.shape][1]

    def extras(self):
        return super().extras() | ({"bias"} if self.bias else set()) | (
            {"value_head_dim"} if self.head_dims else set())

    def segment_ids(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.data not in ("packed", "orphan"):
            return None
        kv_seg = _documents(np.random.default_rng(7), B, self.s)
        q_pos = np.arange(self.t) + self.s - self.t
        q_seg = np.where(q_pos >= 0, kv_seg[:, np.clip(q_pos, 0, None)], -1).astype(np.int32)
        if self.data == "orphan":
            q_seg[0, 1:3] = 99  # a document with queries and no keys
        return q_seg, kv_seg

    def kv_lengths(self) -> np.ndarray | None:
        if self.data == "ragged":
            return np.asarray([self.s - 2, max(1, self.s // 3)], np.int32)
        if self.data == "empty":
            return np.asarray([self.s // 2 + 1, 0], np.int32)
        return None

    def visible(self) -> np.ndarray:
        """``[B, T, S]`` bool from the dense mask and the data, with numpy only."""
        vis = np.broadcast_to(CATALOGUE[self.mask].dense(self.t, self.s), (B, self.t, self.s))
        seg = self.segment_ids()
        if seg is not None:
            vis = vis & (seg[0][:, :, None] == seg[1][:, None, :])
        lengths = self.kv_lengths()
        if lengths is not None:
            vis = vis & (np.arange(self.s)[None, None, :] < lengths[:, None, None])
        return vis

    @functools.cache
    def inputs(self):
        """``(q, k, v, do, mod, data)``: inputs and output cotangent in ``dtype``, the
        modifier, and the keyword arrays of ``calls.Dense``."""
        rng = _rng(self)
        h, hv = self.dims
        q = _normal(rng, (B, self.t, N, h), self.dtype)
        k, v = (_normal(rng, (B, self.s, self.kh, d), self.dtype) for d in (h, hv))
        do = _normal(rng, (B, self.t, N, hv), self.dtype)
        data = {}
        seg = self.segment_ids()
        if seg is not None:
            data["segment_ids"] = (jnp.asarray(seg[0]), jnp.asarray(seg[1]))
        if self.kv_lengths() is not None:
            data["kv_lengths"] = jnp.asarray(self.kv_lengths())
        if self.bias:
            data["bias"] = _normal(rng, (1, N, self.t, self.s), jnp.float32)
        return q, k, v, do, self.score_mod, data


@dataclasses.dataclass(frozen=True)
class CachedCase(Case):
    """``calls.Cached``: ``t`` new queries at positions ``lengths - t ..`` over a contiguous
    cache of 32 slots (two kernel pages), ``lengths`` ``"ragged"``, ``"aligned"`` (page
    multiples) or ``"short"`` (row 0 holds the new tokens only); slots past a row's length
    hold NaN keys and ``GARBAGE`` values."""

    path: ClassVar[str] = "cached"
    mask: str = "causal"
    mod: str = "none"
    gqa: int = 1
    dtype: str = "float32"
    t: int = 1
    lengths: str = "ragged"
    s: ClassVar[int] = 32

    def extras(self):
        banded = CATALOGUE[self.mask].band() is not None
        return super().extras() | ({"unbanded"} if not banded else set())

    def row_lengths(self) -> np.ndarray:
        return _cache_lengths(self.lengths, self.t)

    @functools.cache
    def inputs(self):
        """``(q, k, v, lengths, mod)`` with NaN past each row's length, and the clean k, v."""
        rng = _rng(self)
        q = _normal(rng, (B, self.t, N, H), self.dtype)
        k, v = (_normal(rng, (B, self.s, self.kh, H), self.dtype) for _ in range(2))
        lengths = self.row_lengths()
        unwritten = jnp.asarray(np.arange(self.s)[None, :] >= lengths[:, None])[..., None, None]
        poisoned = tuple(jnp.where(unwritten, x0, x).astype(x.dtype)
                         for x, x0 in ((k, jnp.nan), (v, GARBAGE)))
        return (q, *poisoned, jnp.asarray(lengths), self.score_mod), (k, v)


# Unwritten slots of a cache (and of a row's last page) hold NaN keys and values: a backend
# must keep them out of its logits and out of its weighted sum (0 * NaN is NaN), as a reused
# page's stale contents may be anything.
GARBAGE = float("nan")


def _cache_lengths(name: str, t: int, cap: int = 32) -> np.ndarray:
    return np.asarray({"ragged": (t + 4, cap - 3), "aligned": (cap, cap // 2),
                       "short": (t, cap - 11)}[name], np.int32)


@dataclasses.dataclass(frozen=True)
class PagedCase(Case):
    """``calls.Paged``: ``t`` new queries over a pool ``[K, P, page, 8]`` read through a
    shuffled block table (a row's pages lie anywhere in the pool), up to 32 tokens per
    row plus one table column past every row's pages. ``storage``: ``"float32"``,
    ``"bfloat16"`` (q and pages) or ``"int8"`` (fp32 q, int8 codes, fp32 per-token scales).
    Every page no row owns holds NaN, and the table entries past a row's pages name such
    pages; the slots past a row's length in its last page hold NaN keys and ``GARBAGE``
    values (for int8 pages: the scales)."""

    path: ClassVar[str] = "paged"
    mask: str = "causal"
    mod: str = "none"
    gqa: int = 1
    storage: str = "float32"
    page: int = 16
    t: int = 1
    lengths: str = "ragged"
    cap: ClassVar[int] = 32

    @property
    def dtype(self) -> str:
        return "float32" if self.storage == "int8" else self.storage

    def extras(self):
        banded = CATALOGUE[self.mask].band() is not None
        return super().extras() | ({"unbanded"} if not banded else set()) | (
            {"int8"} if self.storage == "int8" else set())

    def row_lengths(self) -> np.ndarray:
        return _cache_lengths(self.lengths, self.t, self.cap)

    @functools.cache
    def inputs(self, poison_padding: bool = True):
        """``(call arrays, clean arrays)``: ``(q, k_pages, v_pages, tables, lengths,
        k_scales, v_scales)`` with the poison, then the same without. ``poison_padding=False``
        leaves clean the unowned pages that table entries past a row's pages name."""
        rng = _rng(self)
        lengths = self.row_lengths()
        tables, owned = _block_tables(rng, lengths, self.page, self.cap)
        p = owned.size
        q = _normal(rng, (B, self.t, N, H), self.dtype)
        k, v = (rng.standard_normal((self.kh, p, self.page, H), np.float32) for _ in range(2))
        state = _slot_state(tables, lengths, owned, self.page, poison_padding)
        if self.storage == "int8":
            (k, ks), (v, vs) = _quantise(k), _quantise(v)
            clean = (q, k, v, ks, vs)
            dirty = (q, k, v, _poison(ks, state, np.nan), _poison(vs, state, GARBAGE / 127))
        else:
            k, v = (jnp.asarray(x, self.dtype) for x in (k, v))
            clean = (q, k, v, None, None)
            dirty = (q, _poison(k, state, np.nan), _poison(v, state, GARBAGE), None, None)
        lengths, tables = jnp.asarray(lengths), jnp.asarray(tables)
        pack = lambda x: (x[0], x[1], x[2], tables, lengths, x[3], x[4])  # noqa: E731
        return pack(dirty), pack(clean)


def _block_tables(rng, lengths, page, cap, spare=2):
    """A random block table: row ``b`` owns ``ceil(lengths[b] / page)`` scattered pages of a
    pool of ``B * (cap / page + 1) + spare`` (the same pool shape for every case of a page
    size); its other entries name pages nobody owns. Returns ``(tables, owned [P] bool)``."""
    width = cap // page + 1
    p = B * width + spare
    order = iter(rng.permutation(p))
    tables = np.empty((B, width), np.int32)
    owned = np.zeros(p, bool)
    for row, n in zip(tables, -(-lengths // page)):
        row[:n] = [next(order) for _ in range(n)]
        owned[row[:n]] = True
    nobody = np.flatnonzero(~owned)
    for row, n in zip(tables, -(-lengths // page)):
        row[n:] = rng.choice(nobody, width - n)
    return tables, owned


def _slot_state(tables, lengths, owned, page, poison_padding=True) -> np.ndarray:
    """``[P, L]``: 0 a written slot (or one left clean), 1 a slot past its row's length in
    the row's last page, 2 a slot of a page no row owns."""
    state = np.where(owned, 0, 2)[:, None].repeat(page, axis=1)
    for row, n in zip(tables, lengths):
        pages = -(-int(n) // page)
        state[row[pages - 1], n - (pages - 1) * page:] = 1
    if not poison_padding:
        named = np.zeros(owned.size, bool)
        named[tables] = True
        state[~owned & named] = 0
    return state


def _poison(x, state, unwritten):
    """``x [K, P, L, ...]`` with ``unwritten`` in state-1 slots and NaN in state-2 slots."""
    dtype = x.dtype
    x = np.asarray(x, np.float32)
    fill = np.where(state == 2, np.nan, unwritten).reshape(state.shape + (1,) * (x.ndim - 3))
    keep = (state == 0).reshape(fill.shape)
    return jnp.asarray(np.where(keep, x, fill).astype(np.float32), dtype)


def _quantise(x: np.ndarray):
    """Symmetric int8 codes ``[K, P, L, H]`` and fp32 per-(kv head, token) scales."""
    amax = np.abs(x).max(axis=-1)
    scales = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    codes = np.clip(np.round(x / scales[..., None]), -127, 127)
    return jnp.asarray(codes, jnp.int8), jnp.asarray(scales)


@dataclasses.dataclass(frozen=True)
class PagedWriteCase(Case):
    """``calls.PagedWrite``: store ``t`` new tokens of K and V at positions ``lengths - t ..``
    of fp32 pools laid out and poisoned as in :class:`PagedCase`, then attend."""

    path: ClassVar[str] = "paged_write"
    mask: str = "causal"
    mod: str = "none"
    gqa: int = 1
    page: int = 16
    t: int = 1
    lengths: str = "ragged"
    cap: ClassVar[int] = 32
    dtype: ClassVar[str] = "float32"

    def extras(self):
        banded = CATALOGUE[self.mask].band() is not None
        return super().extras() | ({"unbanded"} if not banded else set())

    def row_lengths(self) -> np.ndarray:
        return _cache_lengths(self.lengths, self.t, self.cap)

    @functools.cache
    def inputs(self):
        """``(q, k_new, v_new, k_pages, v_pages, tables, lengths, mod)`` and the pools after
        the write, poisoned and clean: ``(want_k, want_v, clean_k, clean_v)``."""
        rng = _rng(self)
        lengths = self.row_lengths()
        tables, owned = _block_tables(rng, lengths, self.page, self.cap)
        p = owned.size
        q = _normal(rng, (B, self.t, N, H), jnp.float32)
        new = [rng.standard_normal((B, self.t, self.kh, H), np.float32) for _ in range(2)]
        clean = [rng.standard_normal((self.kh, p, self.page, H), np.float32) for _ in range(2)]
        state = _slot_state(tables, lengths, owned, self.page)
        pools = [np.asarray(_poison(x, state, fill)) for x, fill in zip(clean, (np.nan, GARBAGE))]
        after = [x.copy() for x in pools + clean]
        for bi in range(B):
            for i in range(self.t):
                pos = int(lengths[bi]) - self.t + i
                slot = (tables[bi, pos // self.page], pos % self.page)
                for pool, tokens in zip(after, new + new):
                    pool[:, slot[0], slot[1]] = tokens[bi, i]
        args = (q, *map(jnp.asarray, new), *map(jnp.asarray, pools), jnp.asarray(tables),
                jnp.asarray(lengths), self.score_mod)
        return args, tuple(map(jnp.asarray, after))


@dataclasses.dataclass(frozen=True)
class LinearCase(Case):
    """``calls.Linear``: features ``q_f [2, t, 4, 8]``, ``k_f [2, t, 4 / gqa, 8]`` (non-negative,
    as a positive feature map gives), ``v [2, t, 4 / gqa, 8]``, chunks of 8 (ragged at 13).
    ``data``: ``"none"``, ``"packed"``, ``"ragged"`` key lengths, ``"empty"`` (row 0 has 3
    keys and a second document after them that sees none; row 1 has no key)."""

    path: ClassVar[str] = "linear"
    causal: bool = True
    gqa: int = 1
    dtype: str = "float32"
    t: int = 13
    data: str = "none"
    chunk: ClassVar[int] = 8

    def extras(self):
        return frozenset() if self.causal else frozenset({"bidirectional"})

    def segment_ids(self) -> np.ndarray | None:
        if self.data == "packed":
            return _documents(np.random.default_rng(7), B, self.t, p=0.15)
        if self.data == "empty":
            seg = np.zeros((B, self.t), np.int32)
            seg[0, 6:] = 1
            return seg
        return None

    def kv_lengths(self) -> np.ndarray | None:
        return {"ragged": np.asarray([self.t - 3, self.t // 2], np.int32),
                "empty": np.asarray([3, 0], np.int32)}.get(self.data)

    def visible(self) -> np.ndarray:
        t = self.t
        vis = np.broadcast_to(np.tril(np.ones((t, t), bool)) if self.causal else
                              np.ones((t, t), bool), (B, t, t))
        seg = self.segment_ids()
        if seg is not None:
            vis = vis & (seg[:, :, None] == seg[:, None, :])
        if self.kv_lengths() is not None:
            vis = vis & (np.arange(t)[None, None, :] < self.kv_lengths()[:, None, None])
        return vis

    @functools.cache
    def inputs(self):
        """``(q_f, k_f, v, do, data)``."""
        rng = _rng(self)
        q = jnp.asarray(rng.random((B, self.t, N, H), np.float32), self.dtype)
        k = jnp.asarray(rng.random((B, self.t, self.kh, H), np.float32), self.dtype)
        v = _normal(rng, (B, self.t, self.kh, H), self.dtype)
        do = _normal(rng, (B, self.t, N, H), self.dtype)
        data = {}
        if self.segment_ids() is not None:
            data["segment_ids"] = jnp.asarray(self.segment_ids())
        if self.kv_lengths() is not None:
            data["kv_lengths"] = jnp.asarray(self.kv_lengths())
        return q, k, v, do, data


@dataclasses.dataclass(frozen=True)
class GatedCase(Case):
    """``calls.Gated``: ``q [2, 16, 4, 8]``, ``k [2, 16, 4 / gqa, 8]`` (unit-norm rows, as the
    delta rule needs), ``v [2, 16, 4 / gqa, 8]``, a log decay mixing, position by position,
    decays near 0 (< 1e-8), near 1 (within 1e-4) and between. ``decay``: ``"scalar"`` (one
    per head), ``"channel"`` (one per key channel), ``"delta"`` (one per head, and the delta
    rule's ``beta`` in (0, 1)); log decay and beta are fp32 in every case, as layers compute
    their gates. ``chunk`` 5 does not divide T, 8 does. ``data``: ``"packed"`` random
    documents; ``"empty"`` row 0 has 9 keys and a document after them that sees none, row 1
    has no key."""

    path: ClassVar[str] = "gated"
    decay: str = "scalar"
    gqa: int = 1
    dtype: str = "float32"
    chunk: int = 8
    data: str = "packed"
    t: ClassVar[int] = 16

    def segment_ids(self) -> np.ndarray:
        if self.data == "packed":
            return _documents(np.random.default_rng(7), B, self.t, p=0.15)
        seg = np.zeros((B, self.t), np.int32)
        seg[0, 11:] = 1
        return seg

    def kv_lengths(self) -> np.ndarray | None:
        return np.asarray([9, 0], np.int32) if self.data == "empty" else None

    def visible(self) -> np.ndarray:
        """``[B, T, S]``: a query reads the keys written before it (itself included) in its
        document, below its row's length."""
        seg = self.segment_ids()
        vis = np.tril(np.ones((self.t, self.t), bool))[None] & (
            seg[:, :, None] == seg[:, None, :])
        if self.kv_lengths() is not None:
            vis = vis & (np.arange(self.t)[None, None, :] < self.kv_lengths()[:, None, None])
        return vis

    @functools.cache
    def inputs(self):
        """``(q, k, v, do, gates, data)``: ``gates = (log_decay, beta or None)``."""
        rng = _rng(self)
        q = _normal(rng, (B, self.t, N, H), self.dtype)
        k = rng.standard_normal((B, self.t, self.kh, H), np.float32)
        k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), self.dtype)
        v = _normal(rng, (B, self.t, self.kh, H), self.dtype)
        do = _normal(rng, (B, self.t, N, H), self.dtype)
        shape = (B, self.t, self.kh) + ((H,) if self.decay == "channel" else ())
        u = rng.random(shape, np.float32)
        near = rng.integers(0, 3, shape)  # 0: between (a > 0.37), 1: near 1, 2: near 0
        log_decay = jnp.asarray(np.choose(near, [-u, -1e-4 * u, -20.0 - u]), jnp.float32)
        beta = jnp.asarray(rng.random((B, self.t, self.kh), np.float32)) \
            if self.decay == "delta" else None
        data = {"segment_ids": jnp.asarray(self.segment_ids())}
        if self.kv_lengths() is not None:
            data["kv_lengths"] = jnp.asarray(self.kv_lengths())
        return q, k, v, do, (log_decay, beta), data


# --- the cases of each path: pairwise over its factors, plus a few by hand -----------------------

FACTORS: dict[str, dict[str, tuple]] = {
    "dense": {"mask": tuple(CATALOGUE), "mod": MODIFIERS, "gqa": (1, 2, 4),
              "dtype": ("float32", "bfloat16"), "shape": tuple(_DENSE_SHAPES),
              "data": ("none", "packed", "orphan", "ragged", "empty")},
    "cached": {"mask": CACHED_MASKS, "mod": MODIFIERS, "gqa": (1, 2, 4),
               "dtype": ("float32", "bfloat16"), "t": (1, 3),
               "lengths": ("ragged", "aligned", "short")},
    "paged": {"mask": CACHE_MASKS, "mod": MODIFIERS, "gqa": (1, 2, 4),
              "storage": ("float32", "bfloat16", "int8"), "page": (4, 16), "t": (1, 3),
              "lengths": ("ragged", "aligned", "short")},
    "paged_write": {"mask": ("full", "causal", "local"), "mod": ("none", "alibi", "head_scale"),
                    "gqa": (1, 2, 4), "page": (4, 16), "t": (1, 3),
                    "lengths": ("ragged", "aligned", "short")},
    "linear": {"causal": (True, False), "gqa": (1, 2, 4), "dtype": ("float32", "bfloat16"),
               "t": (13, 32), "data": ("none", "packed", "ragged", "empty")},
    # Every case has documents (packing resets); "empty" adds key lengths. G of 1 and 2 only:
    # each case is a compile of the interpreted kernel, and G = 4 adds nothing G = 2 does not.
    "gated": {"decay": ("scalar", "channel", "delta"), "gqa": (1, 2),
              "dtype": ("float32", "bfloat16"), "chunk": (5, 8), "data": ("packed", "empty")},
}
_CASE_TYPES = {"dense": DenseCase, "cached": CachedCase, "paged": PagedCase,
               "paged_write": PagedWriteCase, "linear": LinearCase, "gated": GatedCase}

CASES: dict[str, list[Case]] = {
    path: [_CASE_TYPES[path](**row) for row in pairwise(factors)]
    for path, factors in FACTORS.items()}
CASES["dense"] += [DenseCase("causal", bias=True), DenseCase("local_or_global", gqa=2,
                                                            bias=True, data="ragged")]
# DeBERTa's disentangled tables (self-attention only: T == S): GQA, bf16, a batch row without
# keys and one with padding (tests/kernels/test_disentangled.py covers more, in fp32).
CASES["dense"] += [DenseCase("full", mod="disentangled", gqa=2, dtype="bfloat16",
                             data="empty")]
# Values of their own head dim (MLA: 192-wide q/k, 128-wide v), narrower and wider than q/k
# and padded to other tile widths: two cases between them pairing masks, a modifier, G,
# dtypes, shapes and data (each is a compile of the interpreted kernels, so not a product;
# tests/kernels/test_flash_value_dim.py adds sinks, G = 3 and rows without keys).
UNEQUAL_HEAD_DIMS = [  # every mask of the catalogue and every modifier meets a v of its own width
    DenseCase("causal", gqa=2, data="packed", head_dims=(24, 16)),
    DenseCase("local", mod="alibi", dtype="bfloat16", shape="13x5", data="ragged",
              head_dims=(8, 20)),
    DenseCase("full", mod="t5", gqa=4, shape="5x13", head_dims=(16, 8)),
    DenseCase("local_two_sided", mod="softcap", data="packed", head_dims=(8, 24)),
    DenseCase("strided", mod="sinks", gqa=2, dtype="bfloat16", data="ragged",
              head_dims=(24, 16)),
    DenseCase("bigbird", mod="head_scale", data="empty", head_dims=(16, 8)),
    DenseCase("global", gqa=4, dtype="bfloat16", head_dims=(8, 20)),
    DenseCase("local_or_global", mod="t5", data="ragged", head_dims=(24, 16)),
    DenseCase("strided_and_local", mod="softcap", gqa=2, head_dims=(16, 8)),
    DenseCase("dilated", mod="sinks", data="empty", head_dims=(8, 20)),
    DenseCase("segment_memory", mod="alibi", gqa=2, head_dims=(24, 16)),
]
CASES["dense"] += UNEQUAL_HEAD_DIMS


# --- the reference -------------------------------------------------------------------------------


@functools.cache
def reference_result(case: Case, grads: bool = True):
    """The reference's output (and gradients) for ``case`` in fp32 on its rounded inputs, as
    numpy. Eager: each op compiles once per shape, cheaper here than compiling every case."""
    if isinstance(case, DenseCase):
        q, k, v, do, mod, data = _f32(case.inputs())

        def fn(q, k, v, mod):
            return reference.attention(q, k, v, mask=CATALOGUE[case.mask], score_mod=mod,
                                       **data)
        if not grads:
            return _np32(fn(q, k, v, mod))
        out, pull = jax.vjp(fn, q, k, v, mod)
        return _np32((out, *pull(do)))
    if isinstance(case, LinearCase):
        q, k, v, do, data = _f32(case.inputs())

        def fn(q, k, v):
            return reference.linear_attention(q, k, v, causal=case.causal, **data)
        out, pull = jax.vjp(fn, q, k, v)
        return _np32((out, *pull(do)))
    if isinstance(case, GatedCase):
        q, k, v, do, gates, data = _f32(case.inputs())
        return _np32(_gated_reference_vjp(q, k, v, do, gates, data))
    if isinstance(case, CachedCase):
        (q, _, _, lengths, mod), (k, v) = case.inputs()
        q, k, v = _f32((q, k, v))
        t, s = case.t, case.s
        q_pos = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None]
        slots = jnp.arange(s, dtype=jnp.int32)[None]
        kv_pos = jnp.where(slots < lengths[:, None], slots, -1)
        return _np32(reference.attention(q, k, v, mask=CATALOGUE[case.mask], score_mod=mod,
                                         q_positions=q_pos, kv_positions=kv_pos))
    if isinstance(case, PagedCase):
        _, (q, k, v, tables, lengths, ks, vs) = case.inputs()
        q = q.astype(jnp.float32)
        if ks is None:
            k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        return _np32(reference.paged_attention(
            q, k, v, tables, lengths, mask=CATALOGUE[case.mask], score_mod=case.score_mod,
            k_scales=ks, v_scales=vs))
    if isinstance(case, PagedWriteCase):
        (q, _, _, _, _, tables, lengths, mod), (_, _, k, v) = case.inputs()
        return _np32(reference.paged_attention(q, k, v, tables, lengths,
                                               mask=CATALOGUE[case.mask], score_mod=mod))
    raise TypeError(case)


# --- running a backend: one function per path, compiled per (backend, static values, shapes) ---


def _dense(backend, mask, q, k, v, do, mod, data):
    def fn(q, k, v, mod):
        return backend.dense(calls.Dense(q, k, v, mask=mask, score_mod=mod, **data))
    out, pull = jax.vjp(fn, q, k, v, mod)
    return (out, *pull(do))


def _dense_forward(backend, mask, q, k, v, do, mod, data):
    return backend.dense(calls.Dense(q, k, v, mask=mask, score_mod=mod, **data))


def _linear(backend, causal, chunk, q, k, v, do, data):
    def fn(q, k, v):
        return backend.linear(calls.Linear(q, k, v, causal=causal, chunk=chunk, **data))
    out, pull = jax.vjp(fn, q, k, v)
    return (out, *pull(do))


def _linear_forward(backend, causal, chunk, q, k, v, do, data):
    return backend.linear(calls.Linear(q, k, v, causal=causal, chunk=chunk, **data))


def _gated_vjp(fn, q, k, v, do, gates, data):
    """``(out, dq, dk, dv, (d log_decay, d beta or None))`` of ``fn(q, k, v, gates)``."""
    out, pull = jax.vjp(fn, q, k, v, gates)
    return (out, *pull(do))


@jax.jit
def _gated_reference_vjp(q, k, v, do, gates, data):
    def fn(q, k, v, gates):
        log_decay, beta = gates
        if beta is None:
            return gated_reference.gated_recurrence(q, k, v, log_decay, **data)
        return gated_reference.delta_recurrence(q, k, v, log_decay, beta, **data)
    return _gated_vjp(fn, q, k, v, do, gates, data)


def _gated(backend, chunk, q, k, v, do, gates, data):
    def fn(q, k, v, gates):
        return backend.gated(calls.Gated(q, k, v, gates[0], chunk=chunk, beta=gates[1], **data))
    return _gated_vjp(fn, q, k, v, do, gates, data)


def _gated_forward(backend, chunk, q, k, v, do, gates, data):
    return backend.gated(calls.Gated(q, k, v, gates[0], chunk=chunk, beta=gates[1], **data))


def _cached(backend, mask, q, k, v, lengths, mod):
    return backend.cached(calls.Cached(q, k, v, lengths, mask=mask, score_mod=mod))


def _paged(backend, mask, q, k, v, tables, lengths, ks, vs, mod):
    return backend.paged(calls.Paged(q, k, v, tables, lengths, mask=mask, score_mod=mod,
                                     k_scales=ks, v_scales=vs))


def _paged_write(backend, mask, q, k_new, v_new, k, v, tables, lengths, mod):
    return backend.paged_write(calls.PagedWrite(q, k_new, v_new, k, v, tables, lengths,
                                                mask=mask, score_mod=mod))


_PATH_OF = {_dense: "dense", _dense_forward: "dense", _linear: "linear",
            _linear_forward: "linear", _gated: "gated", _gated_forward: "gated",
            _cached: "cached", _paged: "paged",
            _paged_write: "paged_write"}
_RUNNERS = tuple(_PATH_OF)
_JIT = {f: jax.jit(f, static_argnums=(0, 1, 2) if f in (_linear, _linear_forward) else (0, 1))
        for f in _RUNNERS}


@functools.cache
def resolve(backend):
    """A ``Backend`` for a registered name (the same value each time, so compiles are
    shared), or the value itself."""
    if isinstance(backend, str):
        from tx.attention import registry  # noqa: PLC0415  (names live in the registry)
        return registry.resolve((backend,))[0]
    return backend


# --- the suite -----------------------------------------------------------------------------------


def _path(name: str) -> Callable:
    def mark(fn):
        fn.path = name
        return fn
    return mark


class BackendSuite:
    """Subclass as ``class TestMine(BackendSuite): backend = Mine()`` (or a registered name).

    ``must_serve``: the paths whose core cases the backend must serve (a decline fails the
    test); ``must_serve_optional``: the optional features (``OPTIONAL``) it must serve on
    those paths too; ``differentiable``: the paths whose gradients are checked (dense and
    linear; drop one for a forward-only backend); ``jit``: compile each call as a model
    would (False, or the paths to compile: op by op, for a backend of plain jnp whose cases
    cost more to compile than to run). Hooks: ``cases(path)`` (add a backend's own),
    ``supports(case)`` (decline up front), ``known_failure(case)`` (a known bug, run as a
    strict xfail)."""

    backend: Any = None
    must_serve: tuple[str, ...] = ()
    must_serve_optional: tuple[str, ...] = ()
    differentiable: tuple[str, ...] = ("dense", "linear", "gated")
    jit: bool | tuple[str, ...] = True  # or the paths to compile
    # The block-table entries past a row's pages name a NaN page; False: a clean one nobody
    # owns (for a backend that gathers every entry of a row's table and then masks: 0 * NaN
    # is NaN, so the poison would show through a zero weight).
    poison_table_padding: bool = True

    # --- collection: the cases of every path the backend offers ---

    def pytest_generate_tests(self, metafunc):
        path = getattr(metafunc.function, "path", None)
        if path is None:
            return
        backend = resolve(type(self).backend)
        if path in backend.paths():
            cases = [case if self.known_failure(case) is None else pytest.param(
                case, marks=pytest.mark.xfail(reason=self.known_failure(case), strict=True))
                for case in self.cases(path)]
            metafunc.parametrize("case", cases, ids=[c.id for c in self.cases(path)])
        else:
            reason = f"{backend.name} has no {path} path"
            metafunc.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(
                reason=reason))], ids=["absent"])

    def cases(self, path: str) -> list[Case]:
        """The cases run for ``path`` (override to add a backend's own)."""
        return CASES[path]

    @pytest.fixture(autouse=True)
    def _strict_dtype_promotion(self):
        with jax.numpy_dtype_promotion("strict"):
            yield

    # --- hooks and helpers ---

    @property
    def impl(self):
        return resolve(type(self).backend)

    def known_failure(self, case: Case) -> str | None:
        """Why ``case`` is known to fail (a bug to fix, run as a strict xfail), or None."""
        return None

    def supports(self, case: Case) -> str | None:
        """None when the backend may serve ``case``, else why not: an override declines cases
        up front. Besides, a ``NotImplementedError`` the backend raises (at trace time)
        declines the case it was called on."""
        return None

    def must(self, case: Case) -> bool:
        """Whether declining ``case`` fails: a must-serve path and no optional feature the
        backend may decline."""
        return case.path in self.must_serve and case.extras() <= set(self.must_serve_optional)

    def decline(self, case: Case, reason: str) -> NoReturn:
        """Skips the test (fails it where the backend must serve ``case``); a case with
        optional features the backend may decline is first checked without them."""
        message = f"{self.impl.name} declines {case.path} case {case.id}: {reason}"
        if self.must(case):
            pytest.fail(f"{message}; {self.impl.name} must serve the core {case.path} cases "
                        f"(must_serve={self.must_serve}, must_serve_optional="
                        f"{self.must_serve_optional}).")
        core = case.core()
        if core != case:
            getattr(self, f"check_{case.path}")(core)  # skips or fails in turn if declined
            message += f" (checked without {', '.join(sorted(case.extras() - core.extras()))})"
        pytest.skip(message)

    @contextlib.contextmanager
    def serving(self, case: Case):
        reason = self.supports(case)
        if reason is not None:
            self.decline(case, reason)
        try:
            yield
        except NotImplementedError as e:
            self.decline(case, str(e) or type(e).__name__)

    def run(self, fn, *args):
        jit = self.jit if isinstance(self.jit, bool) else _PATH_OF[fn] in self.jit
        return (_JIT[fn] if jit else fn)(self.impl, *args)

    # --- per path ---

    def check_dense(self, case: DenseCase):
        q, k, v, do, mod, data = case.inputs()
        mask = CATALOGUE[case.mask]
        tol = TOLERANCE["dense"][case.dtype]
        grads = "dense" in self.differentiable
        with self.serving(case):
            got = self.run(_dense if grads else _dense_forward, mask, q, k, v, do, mod, data)
        got = got if grads else (got,)
        out_shape = q.shape[:3] + v.shape[3:]
        assert got[0].dtype == q.dtype and got[0].shape == out_shape, (got[0].dtype,
                                                                      got[0].shape)
        for x, like in zip(got[1:4], (q, k, v)):
            assert x.dtype == like.dtype and x.shape == like.shape, (x.dtype, x.shape)
        got = _np32(got)
        want = reference_result(case, grads=grads)
        want = want if grads else (want,)
        assert_close("out", got[0], want[0], tol["out"])
        for name, x, y in zip(("dq", "dk", "dv"), got[1:4], want[1:4]):
            assert_close(name, x, y, tol["grad"])
        if grads and mod is not None:
            got_mod, want_mod = jax.tree.leaves(got[4]), jax.tree.leaves(want[4])
            assert len(got_mod) == len(want_mod) == len(jax.tree.leaves(mod))
            for x, y in zip(got_mod, want_mod):
                assert_close(f"d {case.mod} parameters", x, y, tol["grad"])
        self._check_hidden_rows(case, got, grads, lambda do: self.run(
            _dense, mask, q, k, v, do, mod, data))

    def _check_hidden_rows(self, case, got, grads, rerun):
        """A query that sees no key returns zeros (no NaN) and passes back zero gradients; a
        loss on such rows alone has no gradient anywhere."""
        hidden = ~case.visible().any(axis=-1)                                   # [B, T]
        out = got[0]
        assert (out[hidden] == 0.0).all(), "a row that sees no key is not zero"
        assert (np.abs(out[~hidden]).sum(axis=-1) > 0).all(), "a row that sees keys is zero"
        if not grads:
            return
        assert (got[1][hidden] == 0.0).all(), "dq of a row that sees no key is not zero"
        lengths = case.kv_lengths()
        if lengths is not None:
            for b in np.flatnonzero(lengths == 0):
                assert (got[2][b] == 0.0).all() and (got[3][b] == 0.0).all(), \
                    "dk, dv of a batch row without keys are not zero"
        if case.data in ("orphan", "empty") and hidden.any():
            do = case.inputs()[3]
            do_hidden = jnp.where(jnp.asarray(hidden)[:, :, None, None], do, jnp.zeros_like(do))
            for leaf in jax.tree.leaves(rerun(do_hidden)[1:]):
                assert not np.asarray(leaf, np.float32).any(), \
                    "a loss on rows that see no key has a gradient"

    def check_linear(self, case: LinearCase):
        q, k, v, do, data = case.inputs()
        tol = TOLERANCE["linear"][case.dtype]
        grads = "linear" in self.differentiable
        args = (case.causal, case.chunk, q, k, v, do, data)
        with self.serving(case):
            got = self.run(_linear if grads else _linear_forward, *args)
        got = got if grads else (got,)
        assert got[0].dtype == v.dtype and got[0].shape == q.shape[:3] + v.shape[3:], \
            (got[0].dtype, got[0].shape)
        got = _np32(got)
        want = reference_result(case)
        for name, x, y in zip(("out", "dq_f", "dk_f", "dv"), got, want):
            assert_close(name, x, y, tol["out" if name == "out" else "grad"])
        self._check_hidden_rows(case, got, grads, lambda do: self.run(
            _linear, *args[:5], do, data))

    def check_gated(self, case: GatedCase):
        q, k, v, do, gates, data = case.inputs()
        tol = TOLERANCE["gated"][case.dtype]
        grads = "gated" in self.differentiable
        args = (case.chunk, q, k, v, do, gates, data)
        with self.serving(case):
            got = self.run(_gated if grads else _gated_forward, *args)
        got = (*got[:4], *got[4]) if grads else (got,)  # the gates' gradients: flat
        assert got[0].dtype == v.dtype and got[0].shape == q.shape[:3] + v.shape[3:], \
            (got[0].dtype, got[0].shape)
        for x, like in zip(got[1:], (q, k, v) + tuple(g for g in gates if g is not None)):
            assert x.dtype == like.dtype and x.shape == like.shape, (x.dtype, x.shape)
        got = _np32(got)
        want = reference_result(case)
        want = (*want[:4], *(g for g in want[4] if g is not None))
        for name, x, y in zip(("out", "dq", "dk", "dv", "dlog_decay", "dbeta"), got, want):
            assert_close(name, x, y, tol["out" if name == "out" else "grad"])
        self._check_hidden_rows(case, got, grads, lambda do: self.run(
            _gated, *args[:4], do, *args[5:]))

    def check_cached(self, case: CachedCase):
        (q, k, v, lengths, mod), _ = case.inputs()
        with self.serving(case):
            out = self.run(_cached, CATALOGUE[case.mask], q, k, v, lengths, mod)
        assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
        assert_close("out", out, reference_result(case), TOLERANCE["cached"][case.dtype]["out"])

    def check_paged(self, case: PagedCase):
        (q, k, v, tables, lengths, ks, vs), _ = case.inputs(self.poison_table_padding)
        with self.serving(case):
            out = self.run(_paged, CATALOGUE[case.mask], q, k, v, tables, lengths, ks, vs,
                           case.score_mod)
        assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
        assert_close("out", out, reference_result(case),
                     TOLERANCE["paged"][case.storage]["out"])

    def check_paged_write(self, case: PagedWriteCase):
        args, (want_k, want_v, _, _) = case.inputs()
        with self.serving(case):
            out, k, v = self.run(_paged_write, CATALOGUE[case.mask], *args)
        q = args[0]
        assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
        for name, x, y in (("k_pages", k, want_k), ("v_pages", v, want_v)):
            assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, x.dtype)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=(
                f"{name}: the pool after the write differs from the pool with the new "
                "tokens at their slots"))
        assert_close("out", out, reference_result(case),
                     TOLERANCE["paged_write"][case.dtype]["out"])

    # --- the suite ---

    def test_dtype_promotion_is_strict(self):
        with pytest.raises(ValueError, match="strict"):
            jnp.ones(2, jnp.float32) + jnp.ones(2, jnp.bfloat16)

    @_path("dense")
    def test_dense(self, case):
        self.check_dense(case)

    @_path("cached")
    def test_cached(self, case):
        self.check_cached(case)

    @_path("paged")
    def test_paged(self, case):
        self.check_paged(case)

    @_path("paged_write")
    def test_paged_write(self, case):
        self.check_paged_write(case)

    @_path("linear")
    def test_linear(self, case):
        self.check_linear(case)

    @_path("gated")
    def test_gated(self, case):
        self.check_gated(case)
