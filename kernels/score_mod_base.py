"""The score-modifier base type: what a modifier reads (``Context``), the parameters it may
declare (``ParamSpec``), ``ScoreMod`` itself and the machinery that makes every subclass a
pytree. The modifiers and the kernels' host-side helpers are in ``kernels.score_mods``, which
re-exports these names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# --- where a modifier runs ---------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    """What a modifier may read, broadcastable against the logits ``s``.

    ``batch``, ``head`` (query head), ``q_pos`` and ``kv_pos`` are int32 arrays. ``params`` is
    the parameter table: ``[N, width]`` in the reference (``head`` indexes it), ``[rows,
    width]`` in a kernel (one row per tile row, already that row's head). ``offset`` is the
    first column of the current modifier (``chain`` shifts it).
    """

    batch: Any
    head: Any
    q_pos: Any
    kv_pos: Any
    params: Any
    in_kernel: bool
    offset: int = 0
    # Row/column tables (``kernels.row_tables``): ``[B, T, N, R]`` / ``[B, S, N, R]`` in the
    # reference, the tile's ``[rows, W]`` / ``[cols, W]`` block in a kernel; None if absent.
    rows: Any = None
    cols: Any = None

    def shifted(self, offset: int) -> "Context":
        return dataclasses.replace(self, offset=self.offset + offset)

    def param(self, j: int):
        """Column ``j`` of this modifier's parameters, per head, broadcastable to ``s``."""
        j += self.offset
        if self.in_kernel:
            cols = jax.lax.broadcasted_iota(jnp.int32, self.params.shape, 1)
            return jnp.sum(jnp.where(cols == j, self.params, 0.0), axis=1, keepdims=True)
        return self.params[self.head, j]

    def lookup(self, index, count: int):
        """``params[head, offset + index]`` for an int array ``index`` in ``[0, count)``."""
        if self.in_kernel:
            out = jnp.zeros(jnp.broadcast_shapes(index.shape, (self.params.shape[0], 1)),
                            jnp.float32)
            for j in range(count):  # count compares beat a gather Triton cannot lower
                out = out + jnp.where(index == j, self.param(j), 0.0)
            return out
        return self.params[self.head, self.offset + index]

    def row_lookup(self, index):
        """``rows[batch, query row, head, index]`` for an int array ``index``."""
        if self.in_kernel:
            from tx.kernels import row_tables  # noqa: PLC0415  (it subclasses ScoreMod)
            return row_tables.tile_lookup(self.rows, index, 0)
        return self.rows[self.batch, self.q_pos, self.head, index].astype(jnp.float32)

    def col_lookup(self, index):
        """``cols[batch, key column, head, index]`` for an int array ``index``."""
        if self.in_kernel:
            from tx.kernels import row_tables  # noqa: PLC0415
            return row_tables.tile_lookup(self.cols, index, 1)
        return self.cols[self.batch, self.kv_pos, self.head, index].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A learned parameter a modifier declares: its shape, ``init(key, shape, dtype)`` and
    logical axis names (default ``("heads", None, ...)``: per-head parameters lead with heads)."""

    shape: tuple
    init: Callable = jax.nn.initializers.zeros
    axes: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.axes is None:
            object.__setattr__(self, "axes", ("heads",) + (None,) * (len(self.shape) - 1))
        if len(self.axes) != len(self.shape):
            _fail("ParamSpec.axes", self.axes, f"must name each of the {len(self.shape)} axes "
                  f"of shape {self.shape} (None for an unsharded axis).")


class ScoreMod:
    """Base class. Subclasses set ``width`` (parameter columns per head) and implement
    ``modify``; those with parameters implement ``head_params``; ``check`` validates shapes
    on the host before anything is traced. Subclasses are pytrees (``data_fields``, or the
    fields holding arrays, are the leaves); ``learned``/``bind`` declare and take parameters
    an attention layer owns."""

    width = 0
    # True when the logits depend on positions only through ``q_pos - kv_pos`` (or not at
    # all): a cache may then shift every position by the same amount (a rolling cache read in
    # time order from 0) and the logits stay exact.
    relative = False
    data_fields = None  # the names of the leaf fields; None: the fields holding arrays

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls, _flatten_with_keys, functools.partial(_unflatten, cls), flatten_func=_flatten)

    def learned(self, num_heads: int) -> dict[str, ParamSpec]:
        """The parameters this modifier asks its attention layer to create and own, by the
        name they take on the layer; empty when it holds its arrays (bound)."""
        return {}

    def bind(self, params, num_heads: int) -> "ScoreMod":
        """This modifier holding the layer's arrays ``params`` (a mapping with at least the
        names ``learned`` declares); by default each name is a field of this dataclass."""
        names = self.learned(num_heads)
        return dataclasses.replace(self, **{k: params[k] for k in names}) if names else self

    def modify(self, s, ctx: Context):
        raise NotImplementedError

    def head_params(self, num_heads: int) -> jax.Array:
        """``[num_heads, width]`` fp32 (differentiable in the leaves)."""
        return jnp.zeros((num_heads, 0), jnp.float32)

    def sink(self) -> jax.Array | None:
        """``[N]`` sink logits, or None."""
        return None

    def tables(self) -> tuple[Any, Any]:
        """``(rows [B, T, N, R] | None, cols [B, S, N, R] | None)``: data per query row and
        per key column (``kernels.row_tables``), read with ``Context.row_lookup`` /
        ``col_lookup``."""
        return None, None

    def check(self, num_heads: int) -> None:
        pass

    def __rshift__(self, other: "ScoreMod") -> "ScoreMod":
        from tx.kernels.score_mods import chain  # noqa: PLC0415  (it subclasses this)
        return chain(self, other)


def _fail(name: str, value: Any, fix: str):
    raise ValueError(f"{name}={value!r} {fix}")


def _per_head(name: str, x: Any, num_heads: int, ndim: int = 1, axis: int = 0) -> None:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != ndim or shape[axis] != num_heads:
        want = "[N]" if ndim == 1 else "[num_buckets, N]"
        _fail(f"{name}.shape", shape, f"must be {want} with N = num_heads = {num_heads}; give "
              "one entry per query head.")


# --- every subclass is a pytree ----------------------------------------------------------------

def _is_data(value) -> bool:
    if isinstance(value, (jax.Array, np.ndarray, ScoreMod)):
        return True
    return isinstance(value, tuple) and bool(value) and all(isinstance(v, ScoreMod)
                                                             for v in value)


def _fields(obj) -> tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]:
    """``(leaf field names, ((static name, value), ...))`` of a modifier."""
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) \
        else sorted(n for n in vars(obj) if n != "_data_fields")
    data = type(obj).data_fields
    if data is None:  # the split a rebuilt value came with, else by value
        data = obj.__dict__.get("_data_fields") if hasattr(obj, "__dict__") else None
    if data is None:
        data = tuple(n for n in names if _is_data(getattr(obj, n)))
    return tuple(data), tuple((n, getattr(obj, n)) for n in names if n not in data)


def _flatten(obj):
    data, static = _fields(obj)
    return [getattr(obj, n) for n in data], (data, static)


def _flatten_with_keys(obj):
    data, static = _fields(obj)
    return [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data], (data, static)


def _unflatten(cls, aux, children):
    """The modifier without running ``__init__`` (its leaves may be None or tracers)."""
    data, static = aux
    obj = object.__new__(cls)
    for name, value in (*zip(data, children), *static):
        object.__setattr__(obj, name, value)
    if cls.data_fields is None and hasattr(obj, "__dict__"):
        object.__setattr__(obj, "_data_fields", data)
    return obj
