"""Sharding by logical names: a ``Parallel`` (mesh + rules) turns the logical axis names that
every tx parameter carries (``nnx.with_partitioning``) into ``NamedSharding``s, for whole
states (parameters, optimizer state, KV caches) or single activations.

A dimension whose size the mesh axes do not divide is kept whole (replicated) rather than
failing: a vocabulary of 40 tokens on ``tensor=16``, a decode batch of 1. For a
batch split over ``("data", "fsdp")`` the longest leading part of that tuple that divides the
size is used. Heads are the exception; ``MeshConfig.check_heads`` rejects uneven head splits
up front, because the attention kernels shard by head.

``use(parallel)`` makes a mesh active while a step is traced; ``constrain`` and the
implementation registry read it, and do nothing when no mesh (or a one-device mesh) is active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from flax.linen import partitioning as linen_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from tx.parallel import mesh as mesh_lib

Names = Sequence[str | None]


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A mesh and the logical-axis rules used on it."""

    mesh: jax.sharding.Mesh
    rules: tuple = mesh_lib.RULES
    context_attention: str = "ring"  # mesh.context_attention: how a split sequence attends

    @property
    def context(self) -> int:
        """The sequence split (1 on a mesh without a ``context`` axis)."""
        return dict(zip(self.mesh.axis_names, self.mesh.devices.shape)).get("context", 1)

    @property
    def size(self) -> int:
        return self.mesh.size

    def _fit(self, axes, dim: int):
        """The mesh axes of one dimension, dropping trailing axes until they divide ``dim``."""
        if axes is None:
            return None
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        while axes and dim % math.prod(self.mesh.shape[a] for a in axes):
            axes = axes[:-1]
        return None if not axes else axes[0] if len(axes) == 1 else axes

    def spec(self, names: Names | None, shape: Sequence[int]) -> PartitionSpec:
        if not names:
            return PartitionSpec()
        if len(names) != len(shape):
            raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}.")
        logical = linen_partitioning.logical_to_mesh_axes(tuple(names), self.rules)
        return PartitionSpec(*(self._fit(a, d) for a, d in zip(logical, shape)))

    def sharding(self, names: Names | None, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def shardings(self, tree: Any) -> Any:
        """``tree`` (of arrays, ``ShapeDtypeStruct``s or ``nnx.Variable``s) -> the same tree of
        ``NamedSharding``s; a Variable's logical names come from its ``out_sharding``."""
        def one(x):
            if isinstance(x, nnx.Variable):
                names = x.get_metadata().get("out_sharding")
                return x.replace(self.sharding(names, np.shape(x.get_value())))
            return self.sharding(None, np.shape(x))
        return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def rows(self) -> NamedSharding:
        """Leading (batch) dimension split over ``(data, fsdp)``, for arrays of any rank whose
        batch the mesh divides (what the config checks): the step's batch in-sharding."""
        return NamedSharding(self.mesh, PartitionSpec(mesh_lib.BATCH_AXES))


# --------------------------------------------------------------------------- the active mesh

_ACTIVE = threading.local()


@contextlib.contextmanager
def use(parallel: Parallel | None):
    """Makes ``parallel`` the active mesh (for tracing steps and calling models)."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = parallel
    try:
        yield parallel
    finally:
        _ACTIVE.value = previous


def active() -> Parallel | None:
    """The active mesh when it has more than one device, else ``None``."""
    parallel = getattr(_ACTIVE, "value", None)
    return parallel if parallel is not None and parallel.size > 1 else None


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Pins an activation's layout by logical names under the active mesh (else a no-op)."""
    parallel = active()
    if parallel is None:
        return x
    if parallel.context > 1 and len(names) >= 3 and names[0] == "batch" and names[1] is None:
        # An activation [B, T, ...]: its sequence splits over the context axis (if any).
        names = ("batch", "length", *names[2:])
    return jax.lax.with_sharding_constraint(x, parallel.sharding(names, x.shape))


# ------------------------------------------------------------------------------- placement


def put(tree: Any, shardings: Any) -> Any:
    """Places host or device arrays with ``shardings``, on one host or many: each process
    supplies the slices its devices hold, cut from the full (identical) host value."""
    def one(x, sharding):
        if sharding.is_fully_addressable:  # one host: a plain transfer
            return jax.device_put(x, sharding)
        if is_prng_key(x):  # typed PRNG keys travel as their uint32 data
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(one, tree, shardings)


def is_prng_key(x) -> bool:
    """A typed PRNG key array (Orbax and host transfers take its uint32 key data)."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def shard_module(module: nnx.Module, parallel: Parallel) -> nnx.Module:
    """Moves every array of ``module`` (parameters, KV caches, ...) into its sharding, in
    place; e.g. after ``init_cache`` to decode with a sharded cache."""
    state = nnx.state(module)
    nnx.update(module, put(state, parallel.shardings(state)))
    return module


def put_batch(parallel: Parallel, batch: dict) -> dict:
    """A host batch (every process holds the same global batch) split over ``(data, fsdp)``."""
    return {k: put(v, parallel.rows()) for k, v in batch.items()}
