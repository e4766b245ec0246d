"""Quantised KV storage: how a cache stores keys and values, as values.

A cache stores K and V each through a *scheme*, a small frozen value that turns a float tensor
into a dict of arrays (its *parts*) and back:

* ``Float(dtype)``: the tensor itself, cast (``{"x": ...}``): what every cache did before.
* ``Int8(scale_dtype)``: symmetric int8, one scale per token and K/V head
  (``max |x| / 127`` over the head dim).
* ``Int4(scale_dtype)``: asymmetric int4 per token and K/V head (a scale and a zero point, the
  minimum), two codes per byte along the head dim.
* ``ChannelInt4(scale_dtype)``: asymmetric int4 per *channel*: one scale and zero point per
  (K/V head, head-dim channel) over the ``L`` tokens of a page, two codes per byte along the
  tokens. Keys have outlier channels (KIVI, Liu et al., 2024, arXiv:2402.02750; KVQuant,
  Hooper et al., 2024): a per-token scale is set by the outlier and crushes every other
  channel, a per-channel one is not.

Token-wise schemes (all but ``ChannelInt4``) quantise each ``[K, H]`` token on its own, so
writing, copying, forking and reordering act on their parts exactly as on the float tensor.
``ChannelInt4`` quantises a whole page at once; only a paged cache can hold it, and only once
the page is full (sealed), so the partial last page stays in the compute dtype.

``KVQuant(key, value, residual)`` pairs the two schemes of a cache. ``KV_DTYPES`` names the
ones the flags offer: ``int8``, ``int4`` (KIVI: per-channel keys, per-token values, the
partial page in full precision) and ``int4_per_token`` (the naive baseline).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from tx.registry import Registry

_SCALE_DTYPES = (jnp.float32, jnp.bfloat16)


def _check_scale_dtype(scheme, value) -> None:
    if jnp.dtype(value) not in [jnp.dtype(d) for d in _SCALE_DTYPES]:
        raise ValueError(f"{type(scheme).__name__}.scale_dtype={value!r}: use jnp.float32 or "
                         "jnp.bfloat16.")


def pack4(codes: jax.Array, axis: int) -> jax.Array:
    """uint8 codes in ``[0, 16)`` -> half as many bytes along ``axis`` (even entries in the
    low nibble)."""
    axis = axis % codes.ndim
    lo = jax.lax.slice_in_dim(codes, 0, None, 2, axis)
    hi = jax.lax.slice_in_dim(codes, 1, None, 2, axis)
    return (lo | (hi << 4)).astype(jnp.uint8)


def unpack4(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of ``pack4``: twice as many uint8 codes along ``axis``."""
    axis = axis % packed.ndim
    both = jnp.stack([packed & 15, packed >> 4], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def _range_codes(x, axis: int, scale_dtype):
    """Asymmetric 4-bit codes over ``axis``: ``(codes uint8, scale, zero)``, scale and zero
    keeping ``axis`` reduced away; ``x ≈ codes * scale + zero``."""
    x = x.astype(jnp.float32)
    lo, hi = x.min(axis=axis), x.max(axis=axis)
    scale = ((hi - lo) / 15).astype(scale_dtype)
    zero = lo.astype(scale_dtype)
    s = jnp.expand_dims(scale.astype(jnp.float32), axis)
    z = jnp.expand_dims(zero.astype(jnp.float32), axis)
    codes = jnp.round((x - z) / jnp.where(s > 0, s, 1.0))
    return jnp.clip(codes, 0, 15).astype(jnp.uint8), scale, zero


@dataclasses.dataclass(frozen=True)
class Float:
    """No quantisation: the tensor in ``dtype``."""

    dtype: Any = jnp.float32
    bits = None
    token_wise = True
    axes = {"x": ("kv_heads", "head_dim")}

    def quantise(self, x: jax.Array) -> dict:
        return {"x": x.astype(self.dtype)}

    def dequantise(self, parts: dict, dtype) -> jax.Array:
        return parts["x"].astype(dtype)

    def check(self, head_dim: int, page_size: int | None, field: str) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Int8:
    """Symmetric int8 per token and K/V head: ``x ≈ codes * scale``, ``|codes| <= 127``."""

    scale_dtype: Any = jnp.float32
    bits = 8
    token_wise = True
    axes = {"codes": ("kv_heads", "head_dim"), "scale": ("kv_heads",)}

    def __post_init__(self):
        _check_scale_dtype(self, self.scale_dtype)

    def quantise(self, x: jax.Array) -> dict:
        x = x.astype(jnp.float32)
        scale = (jnp.abs(x).max(axis=-1) / 127).astype(self.scale_dtype)
        s = scale.astype(jnp.float32)[..., None]
        codes = jnp.clip(jnp.round(x / jnp.where(s > 0, s, 1.0)), -127, 127)
        return {"codes": codes.astype(jnp.int8), "scale": scale}

    def dequantise(self, parts: dict, dtype) -> jax.Array:
        x = parts["codes"].astype(jnp.float32) * parts["scale"].astype(jnp.float32)[..., None]
        return x.astype(dtype)

    def check(self, head_dim: int, page_size: int | None, field: str) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Int4:
    """Asymmetric int4 per token and K/V head (``x ≈ codes * scale + zero``, codes in
    ``[0, 16)``), two codes per byte along the head dim (which must be even)."""

    scale_dtype: Any = jnp.float32
    bits = 4
    token_wise = True
    axes = {"codes": ("kv_heads", "head_dim"), "scale": ("kv_heads",), "zero": ("kv_heads",)}

    def __post_init__(self):
        _check_scale_dtype(self, self.scale_dtype)

    def quantise(self, x: jax.Array) -> dict:
        codes, scale, zero = _range_codes(x, -1, self.scale_dtype)
        return {"codes": pack4(codes, -1), "scale": scale, "zero": zero}

    def dequantise(self, parts: dict, dtype) -> jax.Array:
        codes = unpack4(parts["codes"], -1).astype(jnp.float32)
        x = codes * parts["scale"].astype(jnp.float32)[..., None] \
            + parts["zero"].astype(jnp.float32)[..., None]
        return x.astype(dtype)

    def check(self, head_dim: int, page_size: int | None, field: str) -> None:
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} is odd but {field}=int4 packs two values "
                             "per byte along the head dim; use an even head_dim or int8.")


@dataclasses.dataclass(frozen=True)
class ChannelInt4:
    """Asymmetric int4 per (K/V head, channel) over a page's ``L`` tokens: ``quantise`` takes
    whole pages of one head each, ``[..., L, H]`` (the paged cache's pool is K/V-head major);
    codes are packed two per byte along the tokens, so ``L`` must be even."""

    scale_dtype: Any = jnp.float32
    bits = 4
    token_wise = False
    axes = {"codes": ("kv_heads", "head_dim"), "scale": ("kv_heads", "head_dim"),
            "zero": ("kv_heads", "head_dim")}

    def __post_init__(self):
        _check_scale_dtype(self, self.scale_dtype)

    def quantise(self, x: jax.Array) -> dict:
        codes, scale, zero = _range_codes(x, -2, self.scale_dtype)
        return {"codes": pack4(codes, -2), "scale": scale, "zero": zero}

    def dequantise(self, parts: dict, dtype) -> jax.Array:
        codes = unpack4(parts["codes"], -2).astype(jnp.float32)
        x = codes * parts["scale"].astype(jnp.float32)[..., None, :] \
            + parts["zero"].astype(jnp.float32)[..., None, :]
        return x.astype(dtype)

    def check(self, head_dim: int, page_size: int | None, field: str) -> None:
        if page_size is None:
            raise ValueError(f"{field}=int4 (KIVI) quantises keys per channel over a page, so "
                             "it needs the paged cache: use cache=Paged(page_size), or "
                             f"{field}=int4_per_token / int8 for a contiguous cache.")
        if page_size % 2:
            raise ValueError(f"cache.page_size={page_size} is odd but {field}=int4 (KIVI) packs "
                             "two tokens per byte in a page; use an even page size, e.g. 16.")


@dataclasses.dataclass(frozen=True)
class KVQuant:
    """How a cache stores keys and values.

    Attributes:
      key, value: the schemes of K and V.
      residual: keep the partial last page in the compute dtype and quantise a page once it
        is full (sealed). Required when a scheme is not token-wise.
    """

    key: Any
    value: Any
    residual: bool = False

    def __post_init__(self):
        if not self.residual and not (self.key.token_wise and self.value.token_wise):
            raise ValueError(f"KVQuant(key={self.key!r}, value={self.value!r}): a scheme that "
                             "quantises whole pages needs residual=True.")

    @property
    def quantised(self) -> bool:
        return not (isinstance(self.key, Float) and isinstance(self.value, Float))

    def check(self, head_dim: int, page_size: int | None,
              field: str = "kv_dtype") -> None:
        """Errors naming ``field`` when this storage cannot hold the given shapes."""
        if self.residual and page_size is None:
            raise ValueError(f"{field}={self!r} keeps a full-precision partial page, which "
                             "needs the paged cache: use cache=Paged(page_size).")
        self.key.check(head_dim, page_size, field)
        self.value.check(head_dim, page_size, field)


def float_kv(dtype=jnp.float32) -> KVQuant:
    """Unquantised storage in ``dtype``."""
    return KVQuant(Float(dtype), Float(dtype))


def int8_kv(scale_dtype=jnp.float32) -> KVQuant:
    """int8 keys and values, per token and K/V head."""
    return KVQuant(Int8(scale_dtype), Int8(scale_dtype))


def int4_per_token_kv(scale_dtype=jnp.float32) -> KVQuant:
    """int4 keys and values, per token and K/V head (the naive baseline of KIVI's paper)."""
    return KVQuant(Int4(scale_dtype), Int4(scale_dtype))


def kivi_kv(scale_dtype=jnp.float32) -> KVQuant:
    """int4 KIVI on pages: keys per channel, values per token, the partial page unquantised."""
    return KVQuant(ChannelInt4(scale_dtype), Int4(scale_dtype), residual=True)


# The names ``--kv_dtype`` / ``inference.kv_dtype`` accept; ``auto`` stores the compute dtype.
# ``--kv_dtype`` names -> scheme builders (``auto``, the compute dtype, is the flag's default).
KV_DTYPES = Registry("KV storage scheme", "kv_dtype",
                     register_hint="tx.attention.quant.KV_DTYPES.register(name, fn)")
for _name, _fn in (("int8", int8_kv), ("int4", kivi_kv), ("int4_per_token", int4_per_token_kv)):
    # prints: the name of a scheme equal to the one the name builds (tx.registry.Registry.spell)
    KV_DTYPES.register(_name, _fn, prints=lambda v, _fn=_fn: v == _fn() and {})


def storage(scheme, shape: tuple, dtype=jnp.float32) -> dict:
    """``{part: ShapeDtypeStruct}`` that ``scheme`` stores for a float tensor of ``shape``."""
    shape, dtype = tuple(int(x) for x in shape), jnp.dtype(dtype)
    try:
        hash(scheme)
    except TypeError:  # a researcher's own mutable scheme: traced every time
        return jax.eval_shape(scheme.quantise, jax.ShapeDtypeStruct(shape, dtype))
    return dict(_storage(scheme, shape, dtype))


@functools.lru_cache(maxsize=256)
def _storage(scheme, shape: tuple, dtype) -> tuple:
    # Memoised: every cache built for a generate call asks again, and tracing ``quantise``
    # costs a large part of a short decode's host time. Schemes are frozen (hashable) values.
    return tuple(jax.eval_shape(scheme.quantise, jax.ShapeDtypeStruct(shape, dtype)).items())


def zeros(scheme, shape: tuple, dtype=jnp.float32) -> dict:
    """Empty storage (every part zero: dequantises to zeros) for a tensor of ``shape``."""
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in storage(scheme, shape,
                                                                      dtype).items()}


def nbytes(scheme, shape: tuple, dtype=jnp.float32) -> int:
    """Bytes ``scheme`` stores for a float tensor of ``shape``."""
    return sum(s.size * s.dtype.itemsize for s in storage(scheme, shape, dtype).values())
