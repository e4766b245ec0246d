"""The device mesh of a config: ``(data, fsdp, tensor, context)`` degrees, validated, and the
rules that map the parameters' (and activations') logical axis names onto those mesh axes.

* ``data``: batch rows split across devices, parameters replicated (data parallel).
* ``fsdp``: batch rows split too, and every parameter's ``embed`` dimension split across the
  same devices (ZeRO-3 style; XLA gathers a layer's weights just before using them).
* ``tensor``: attention heads, MLP hidden units and the vocabulary split (Megatron style); a
  block's activations are summed across these devices after the output projections.
* ``context``: the sequence split (context parallelism): activations ``[B, T, ...]`` split
  on ``T``, attention computed as a ring (``tx.parallel.ring``) or by all-to-all
  (``tx.parallel.ulysses``), as ``context_attention`` says.

The default ``(1, 1, 1)`` runs on the first device exactly as tx always did; any other mesh
must use every device (``data * fsdp * tensor * context == jax.device_count()``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

AXES = ("data", "fsdp", "tensor", "context")
CONTEXT_ATTENTION = ("ring", "all_to_all")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes, in order of precedence (``flax.linen.logical_to_mesh_axes``
# semantics: a mesh axis already used by an earlier dimension of the same array is skipped, so
# activations ``(batch, length, embed)`` split the batch over fsdp and keep ``embed`` whole,
# while the parameters, which have no batch dimension, split ``embed`` over fsdp).
# Names not listed (length, head_dim, classes, relpos_buckets) stay unsplit.
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", "context"),
)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mesh.{name}={value!r}: must be a positive integer (1 = not split).")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Parallelism degrees; their product is the number of devices the run uses."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    context_attention: str = "ring"  # how attention runs on a split sequence

    def __post_init__(self):
        for name in AXES:
            _positive_int(name, getattr(self, name))
        if self.context_attention not in CONTEXT_ATTENTION:
            raise ValueError(f"mesh.context_attention={self.context_attention!r}: use one of "
                             f"{CONTEXT_ATTENTION}.")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.tensor, self.context)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor * self.context

    @property
    def batch_shards(self) -> int:
        """How many ways a batch is split (its rows per device = batch / this)."""
        return self.data * self.fsdp

    def check_devices(self, device_count: int | None = None) -> None:
        n = jax.device_count() if device_count is None else device_count
        if self.size != 1 and self.size != n:
            names = [f"mesh.{a}" for a in AXES if a != "context" or self.context > 1]
            degrees = [str(d) for a, d in zip(AXES, self.shape) if a != "context" or d > 1]
            raise ValueError(
                f"{' * '.join(names)} = {' * '.join(degrees)} = {self.size}, but "
                f"jax.device_count() is {n}; choose degrees whose product is {n} (or all 1 "
                "for one device).")

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """Heads are split evenly over ``tensor``; MQA's single K/V head is replicated."""
        t = self.tensor
        if num_heads % t:
            raise ValueError(f"mesh.tensor={t} must divide model.num_heads={num_heads}; "
                             "pick a tensor degree that divides the number of heads.")
        if num_kv_heads % t and num_kv_heads != 1:
            raise ValueError(
                f"mesh.tensor={t} must divide model.num_kv_heads={num_kv_heads} (or use one "
                "K/V head, MQA, which every tensor shard keeps whole); pick a tensor degree "
                "that divides num_kv_heads.")

    def check_context(self, num_heads: int, num_kv_heads: int) -> None:
        """All-to-all splits each tensor shard's heads over ``context`` (MQA's one K/V head
        is gathered whole); the ring splits no heads."""
        c, t = self.context, self.tensor
        if c == 1 or self.context_attention != "all_to_all":
            return
        n, k = num_heads // t, max(1, num_kv_heads // t)
        if n % c or (k % c and k != 1):
            raise ValueError(
                f"mesh.context_attention='all_to_all' splits heads over mesh.context={c}, "
                f"which must divide the heads of each tensor shard (num_heads={num_heads}, "
                f"num_kv_heads={num_kv_heads} over mesh.tensor={t}: {n} and {k}); use "
                "mesh.context_attention='ring', or a context size that divides them.")

    def check_sequence(self, length: int, field: str = "seq_len") -> None:
        """The ring cuts a sequence into ``2 * context`` chunks (two per device, the zigzag
        layout's pairs); all-to-all splits it into ``context`` shards."""
        c = self.context
        if c == 1:
            return
        ways, why = (c, "all-to-all splits it into mesh.context shards") \
            if self.context_attention == "all_to_all" else \
            (2 * c, "ring attention cuts it into 2 * mesh.context chunks, two per device")
        if length % ways:
            raise ValueError(
                f"{field}={length} must be divisible by {ways} under mesh.context={c} "
                f"(mesh.context_attention={self.context_attention!r}: {why}); use a length "
                f"that is a multiple of {ways} (e.g. {length + (-length) % ways}), or a "
                "smaller mesh.context.")

    def check_batch(self, batch: int, field: str = "batch") -> None:
        if batch % self.batch_shards:
            raise ValueError(
                f"{field}={batch} must be divisible by mesh.data * mesh.fsdp = {self.data} * "
                f"{self.fsdp} = {self.batch_shards}, the number of ways a batch is split.")


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ``AXES``; ``(1, 1, 1, 1)`` is the first device alone."""
    devices = jax.devices() if devices is None else list(devices)
    config.check_devices(len(devices))
    grid = np.asarray(devices[:config.size]).reshape(config.shape)
    return jax.sharding.Mesh(grid, AXES)


# Environment variables that say this process is one of several (set by the launcher).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def launched_on_many_hosts() -> bool:
    """Whether a launcher started several processes (JAX's coordinator address, or SLURM /
    Open MPI with more than one task)."""
    return any(os.environ.get(k, "1") not in ("", "1") for k in _CLUSTER_ENV)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to a multi-host run (``jax.distributed.initialize``); call it before
    anything touches a device. Arguments left ``None`` are detected by JAX from the cluster
    environment (SLURM, Open MPI, Kubernetes, Cloud TPU; ``JAX_COORDINATOR_ADDRESS``).
    Afterwards ``jax.devices()`` lists the devices of every host, and a mesh spans them all."""
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
