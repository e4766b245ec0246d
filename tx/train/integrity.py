"""Checksums and finiteness of a train state, computed on the devices in one compiled pass.

A checksum is a position-weighted sum of each array's bit patterns modulo 2**32, twice with
different odd weights (64 bits per array). Integer addition modulo 2**32 is exact and
order-free, so the value does not depend on how the array is sharded or reduced: a state saved
under one mesh verifies under another, on several hosts (each reduces its own shards), or on
one CPU. Every weight is odd, so changing any single element changes both sums; a change that
cancels in both is a coincidence of about 2**-64. It guards against storage corruption, not
against an adversary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Two odd 32-bit multipliers (golden-ratio and murmur constants) for the position weights.
_MULTIPLIERS = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA77))


def _bits(x: jax.Array) -> jax.Array:
    """The array's bit patterns as a flat uint32 vector (8-bit and 16-bit types widened,
    64-bit types split into two words)."""
    if x.dtype == jnp.bool_:
        return jnp.ravel(x).astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jnp.ravel(jax.lax.bitcast_convert_type(x, width)).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    position = jax.lax.iota(jnp.uint32, bits.size)
    sums = [jnp.sum(bits * ((position * m) | np.uint32(1)), dtype=jnp.uint32)
            for m in _MULTIPLIERS]
    return jnp.stack(sums)


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


@jax.jit
def _summarise(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    digests = jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2),
                                                                            jnp.uint32)
    finite = jnp.all(jnp.stack([_finite(x) for x in leaves])) if leaves else jnp.asarray(True)
    return digests, finite


def summarise(tree: Any) -> tuple[dict[str, str], bool]:
    """-> ({array path: 16 hex digits}, whether every float in ``tree`` is finite).

    ``tree`` holds plain arrays (typed PRNG keys already turned into their key data)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    digests, finite = jax.device_get(_summarise([jnp.asarray(x) for _, x in flat]))
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    return ({n: f"{int(a):08x}{int(b):08x}" for n, (a, b) in zip(names, digests)},
            bool(finite))


def first_mismatch(saved: dict[str, str], read: dict[str, str]) -> str | None:
    """The first array whose checksum differs (or that one side lacks), or ``None``."""
    for name in sorted(set(saved) | set(read)):
        if saved.get(name) != read.get(name):
            return name
    return None
