"""Score modifiers: small values that change attention logits before the softmax.

A score modifier maps the scaled fp32 logits ``s`` (natural units, after ``q . k * scale``) of
each visible (query, key) pair to new logits. The same value runs in the ``xla`` reference
(``kernels.reference.attention``), inside the flash kernels (forward, dq, dk/dv) and inside the
paged decode kernel, so a model keeps one definition of its logits on every path:

* ``ALiBi(slopes)``: ``s - slope[n] * |q_pos - kv_pos|``;
* ``T5Bias(table, max_distance, bidirectional)``: ``s + table[bucket(kv_pos - q_pos), n]``,
  the bucket computed from the positions, never a ``[T, S]`` bias tensor;
* ``SoftCap(cap)``: ``cap * tanh(s / cap)`` (Gemma 2);
* ``Sinks(logits)``: a learned per-head logit that joins every row's softmax and carries no
  value (it takes probability mass; a row that sees no key returns zeros);
* ``ScoreFn(fn)``: a user's traceable ``fn(score, batch, head, q_pos, kv_pos) -> score``.

``chain(a, b)`` (or ``a >> b``) applies ``a`` then ``b``. Masks decide visibility first and a
modifier only changes the logits of visible pairs, so tile skipping stays exact.

Parameters. A modifier's arrays are pytree leaves (``jax.grad`` reaches them); the rest
(caps, bucket counts, functions) is static and hashable, so a kernel specialises on the
tree structure. Every subclass is a pytree on definition (no registration by hand): the
fields its ``data_fields`` names are leaves, or, when it names none, every field holding an
array or a modifier (or a tuple of modifiers); the other fields are static.

Learned modifiers. A modifier may declare per-head parameters that an attention layer creates
and owns: ``learned(num_heads) -> {name: ParamSpec(shape, init, axes)}`` (empty once bound),
and ``bind(params, num_heads)`` returns the modifier holding the layer's arrays (by default
the fields of the declared names). ``Sinks()`` is one: unbound, it asks for ``sink_n``. An
unbound modifier is refused by the kernels and the reference, naming what it lacks.

Kernels see the parameters as one ``[N, width]`` fp32 table (``head_params``), one row per
query head, and read a column with ``Context.param`` or a data-dependent column with
``Context.lookup``; in a kernel those are masked reductions (no gathers, no slices), so their
transposes lower through Triton too and the gradient of the table comes out of the backward
kernel per head and column.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

# The base type, its context and the pytree machinery live in ``score_mod_base``; they are
# this module's names too (``score_mods.ScoreMod``, ``score_mods.Context``...).
from tx.kernels.score_mod_base import (  # noqa: F401  (re-exported)
    Context, ParamSpec, ScoreMod, _fail, _per_head)

# --- the modifiers -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class ALiBi(ScoreMod):
    """Linear distance penalty ``-slopes[n] * |q_pos - kv_pos|`` (Press et al., 2022)."""

    relative = True

    slopes: Any  # [N]
    width = 1
    data_fields = ("slopes",)

    def modify(self, s, ctx):
        distance = jnp.abs(ctx.q_pos - ctx.kv_pos).astype(jnp.float32)
        return s - ctx.param(0) * distance

    def head_params(self, num_heads):
        return jnp.asarray(self.slopes, jnp.float32).reshape(num_heads, 1)

    def check(self, num_heads):
        _per_head("ALiBi.slopes", jnp.asarray(self.slopes), num_heads)


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """Press et al. (2022): geometric slopes ``2^(-8/n), 2^(-16/n), ...`` for n heads.

    For n not a power of two, take the slopes for the largest power of two m < n, then fill
    the remaining n - m heads with every other slope for 2m (the 1st, 3rd, ...), which
    interleave with the first set.
    """
    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    m = 2 ** int(math.floor(math.log2(num_heads)))
    return tuple(geometric(m) + geometric(2 * m)[0::2][:num_heads - m])


def t5_bucket(relative_position, *, num_buckets: int, max_distance: int, bidirectional: bool):
    """T5's bucket of ``relative_position = kv_pos - q_pos`` (Raffel et al., 2020).

    When bidirectional, keys after the query get their own half of the buckets. Within a
    half, the first half of the buckets hold exact distances (nearby tokens matter most),
    the rest cover distances up to ``max_distance`` logarithmically, and farther keys share
    the last bucket. Elementwise jnp, so it runs inside a kernel too.
    """
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative_position > 0, num_buckets, 0)  # keys after the query
        distance = jnp.abs(relative_position)
    else:
        offset = jnp.zeros_like(relative_position)
        distance = jnp.maximum(-relative_position, 0)  # future keys collapse into bucket 0
    max_exact = num_buckets // 2
    # max(distance, 1) keeps log finite; those entries take the exact branch anyway.
    log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                 / math.log(max_distance / max_exact))
    far = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return offset + jnp.where(distance < max_exact, distance, far)


@dataclasses.dataclass(frozen=True, eq=False)
class T5Bias(ScoreMod):
    """T5's learned per-head bias over relative-distance buckets: ``table [buckets, N]``."""

    relative = True

    table: Any
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    data_fields = ("table",)

    @property
    def width(self):
        return self.num_buckets

    def modify(self, s, ctx):
        bucket = t5_bucket(ctx.kv_pos - ctx.q_pos, num_buckets=self.num_buckets,
                           max_distance=self.max_distance, bidirectional=self.bidirectional)
        return s + ctx.lookup(bucket, self.num_buckets)

    def head_params(self, num_heads):
        return jnp.asarray(self.table).astype(jnp.float32).T

    def check(self, num_heads):
        if isinstance(self.num_buckets, bool) or not isinstance(self.num_buckets, int) or \
                self.num_buckets < 2 or (self.bidirectional and self.num_buckets % 4):
            _fail("T5Bias.num_buckets", self.num_buckets, "must be an integer >= 2 (a multiple "
                  "of 4 when bidirectional: half per direction), e.g. 32.")
        half = self.num_buckets // (2 if self.bidirectional else 1)
        if not isinstance(self.max_distance, int) or self.max_distance <= half // 2:
            _fail("T5Bias.max_distance", self.max_distance, f"must be an integer > {half // 2} "
                  "(the exact buckets), e.g. 128.")
        shape = tuple(getattr(self.table, "shape", ()))
        if shape != (self.num_buckets, num_heads):
            _fail("T5Bias.table.shape", shape, f"must be [num_buckets, N] = "
                  f"[{self.num_buckets}, {num_heads}]; one learned bias per bucket and head.")


@dataclasses.dataclass(frozen=True)
class SoftCap(ScoreMod):
    """``cap * tanh(s / cap)``: logits bounded to ``(-cap, cap)`` (Gemma 2)."""

    relative = True

    cap: float
    data_fields = ()

    def __post_init__(self):
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)) or \
                not math.isfinite(self.cap) or self.cap <= 0:
            _fail("SoftCap.cap", self.cap, "must be a finite float > 0, e.g. 50.0 (Gemma 2).")

    def modify(self, s, ctx):
        return self.cap * jnp.tanh(s / self.cap)


@dataclasses.dataclass(frozen=True, eq=False)
class Sinks(ScoreMod):
    """A learned per-head logit ``logits [N]`` in every row's softmax, with no value: the row's
    weights are ``softmax([s, sink])`` without the sink's column (StreamingLLM, gpt-oss).
    ``Sinks()`` is unbound: an attention layer creates ``sink_n`` (zeros) and binds it."""

    relative = True

    logits: Any = None
    data_fields = ("logits",)

    def modify(self, s, ctx):
        return s

    def learned(self, num_heads):
        return {} if self.logits is not None else {"sink_n": ParamSpec((num_heads,))}

    def bind(self, params, num_heads):
        return self if self.logits is not None else Sinks(params["sink_n"])

    def sink(self):
        return jnp.asarray(self.logits).astype(jnp.float32)

    def check(self, num_heads):
        _per_head("Sinks.logits", self.logits, num_heads)


@dataclasses.dataclass(frozen=True)
class ScoreFn(ScoreMod):
    """A user's ``fn(score, batch, head, q_pos, kv_pos) -> score``: fp32 logits and int32
    indices broadcastable against them; it must be traceable, elementwise and return fp32
    of the logits' shape. Differentiated by JAX inside the kernels."""

    fn: Callable
    data_fields = ()

    def __post_init__(self):
        if not callable(self.fn):
            _fail("ScoreFn.fn", self.fn, "must be a callable fn(score, batch, head, q_pos, "
                  "kv_pos) -> score.")

    def modify(self, s, ctx):
        out = self.fn(s, ctx.batch, ctx.head, ctx.q_pos, ctx.kv_pos)
        shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if shape != s.shape or dtype != s.dtype:
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise TypeError(f"ScoreFn.fn={name} returned shape {shape} dtype {dtype} for "
                            f"scores of shape {s.shape} dtype {s.dtype}; return the same "
                            "shape and float32 (e.g. jnp.broadcast_to(x, score.shape)"
                            ".astype(score.dtype)).")
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Chain(ScoreMod):
    """``mods`` applied in order; their parameter columns laid side by side."""

    @property
    def relative(self):
        return all(m.relative for m in self.mods)

    mods: tuple
    data_fields = ("mods",)

    @property
    def width(self):
        return sum(m.width for m in self.mods)

    def modify(self, s, ctx):
        offset = 0
        for m in self.mods:
            s = m.modify(s, ctx.shifted(offset))
            offset += m.width
        return s

    def head_params(self, num_heads):
        return jnp.concatenate([m.head_params(num_heads) for m in self.mods], axis=1)

    def learned(self, num_heads):
        out = {}
        for m in self.mods:
            for name, spec in m.learned(num_heads).items():
                if name in out:
                    _fail("chain", self.mods, f"declares the learned parameter {name!r} twice; "
                          "give each modifier's parameters their own names.")
                out[name] = spec
        return out

    def bind(self, params, num_heads):
        return Chain(tuple(m.bind(params, num_heads) for m in self.mods))

    def sink(self):
        sinks = [m.sink() for m in self.mods if m.sink() is not None]
        return sinks[0] if sinks else None

    def tables(self):
        found = [m.tables() for m in self.mods
                 if any(x is not None for x in m.tables())]
        if len(found) > 1:
            _fail("chain", self.mods, "holds more than one modifier with row/column tables; "
                  "give one (e.g. one row_tables.Disentangled with both terms).")
        return found[0] if found else (None, None)

    def check(self, num_heads):
        if sum(isinstance(m, Sinks) for m in self.mods) > 1:
            _fail("chain", self.mods, "holds more than one Sinks; give one sink per head.")
        for m in self.mods:
            m.check(num_heads)


def chain(*mods: ScoreMod | None) -> ScoreMod | None:
    """The modifiers applied in order (``None`` entries dropped; nested chains flattened)."""
    flat = []
    for m in mods:
        if m is None:
            continue
        if not isinstance(m, ScoreMod):
            raise ValueError(f"score_mod={m!r} is not a kernels.score_mods value (ALiBi, "
                             "T5Bias, SoftCap, Sinks, ScoreFn).")
        flat.extend(m.mods if isinstance(m, Chain) else (m,))
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else Chain(tuple(flat))


# --- host-side use by the kernels and the reference --------------------------------------------

def check(score_mod: Any, num_heads: int) -> ScoreMod | None:
    """``score_mod`` validated for ``num_heads`` query heads (on shapes only: before tracing)."""
    if score_mod is None:
        return None
    if not isinstance(score_mod, ScoreMod):
        raise ValueError(f"score_mod={score_mod!r} must be a kernels.score_mods value (ALiBi, "
                         "T5Bias, SoftCap, Sinks, ScoreFn, chain(...)) or None.")
    missing = score_mod.learned(num_heads)
    if missing:
        raise ValueError(f"score_mod={score_mod!r} is unbound: it declares the learned "
                         f"parameters {sorted(missing)}, which an attention layer creates and "
                         "binds (tx.attention.Attention); to call a kernel directly, bind it: "
                         "score_mod.bind({name: array}, num_heads).")
    score_mod.check(num_heads)
    return score_mod


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
    """A modifier's tree structure, hashable and comparable with anything (a kernel config
    holding it may be compared with one holding None: a bare treedef raises there)."""

    treedef: Any

    def __eq__(self, other):
        return isinstance(other, Structure) and self.treedef == other.treedef

    def __hash__(self):
        return hash(self.treedef)


def split(score_mod: ScoreMod | None, num_heads: int, *, tables: bool = False):
    """``(structure, params [N, width] | None, sinks [N] | None)``: the static part a kernel
    specialises on and the arrays it reads (both differentiable). A kernel that reads no
    row/column tables (``tables=False``) refuses a modifier holding them: it would drop them."""
    if score_mod is None:
        return None, None, None
    if not tables and any(x is not None for x in score_mod.tables()):
        raise ValueError(f"score_mod={type(score_mod).__name__} holds row/column tables "
                         "(kernels.row_tables), which only dense self-attention takes "
                         "(reference.attention, flash_attention); this kernel would drop them.")
    structure = Structure(jax.tree_util.tree_structure(score_mod))
    params = score_mod.head_params(num_heads) if score_mod.width else None
    return structure, params, score_mod.sink()


def rebuild(structure):
    """A modifier of ``structure`` whose leaves are None: kernels only call ``modify``, which
    reads parameters through the ``Context``."""
    treedef = structure.treedef
    return jax.tree_util.tree_unflatten(treedef, [None] * treedef.num_leaves)


def reference_logits(score_mod: ScoreMod, logits, *, head, batch, q_pos, kv_pos,
                     num_heads: int):
    """``logits`` of any layout modified in the reference (``head`` etc. broadcastable)."""
    params = score_mod.head_params(num_heads) if score_mod.width else None
    rows, cols = score_mod.tables()
    ctx = Context(batch=batch, head=head, q_pos=q_pos, kv_pos=kv_pos, params=params,
                  in_kernel=False, rows=rows, cols=cols)
    return score_mod.modify(logits, ctx)


def tables(score_mod: ScoreMod | None) -> tuple[Any, Any]:
    """``score_mod``'s row and column tables (``(None, None)`` when it has none)."""
    return (None, None) if score_mod is None else score_mod.tables()


def pad_width(width: int) -> int:
    """Triton blocks are powers of two: the padded parameter columns a kernel loads."""
    return 1 << max(0, width - 1).bit_length() if width else 0
