"""The device mesh of a config: ``(data, fsdp, tensor)`` degrees, validated, and the rules that
map the parameters' logical axis names onto those mesh axes.

* ``data``: batch rows split across devices, parameters replicated (data parallel).
* ``fsdp``: batch rows split too, and every parameter's ``embed`` dimension split across the
  same devices (ZeRO-3 style; XLA gathers a layer's weights just before using them).
* ``tensor``: attention heads, MLP hidden units and the vocabulary split (Megatron style); a
  block's activations are summed across these devices after the output projections.

The default ``(1, 1, 1)`` runs on the first device exactly as tx always did; any other mesh
must use every device (``data * fsdp * tensor == jax.device_count()``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

AXES = ("data", "fsdp", "tensor")
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

    def __post_init__(self):
        for name in AXES:
            _positive_int(name, getattr(self, name))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        """How many ways a batch is split (its rows per device = batch / this)."""
        return self.data * self.fsdp

    def check_devices(self, device_count: int | None = None) -> None:
        n = jax.device_count() if device_count is None else device_count
        if self.size != 1 and self.size != n:
            raise ValueError(
                f"mesh.data * mesh.fsdp * mesh.tensor = {self.data} * {self.fsdp} * "
                f"{self.tensor} = {self.size}, but jax.device_count() is {n}; choose degrees "
                f"whose product is {n} (or all 1 for one device).")

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

    def check_batch(self, batch: int, field: str = "batch") -> None:
        if batch % self.batch_shards:
            raise ValueError(
                f"{field}={batch} must be divisible by mesh.data * mesh.fsdp = {self.data} * "
                f"{self.fsdp} = {self.batch_shards}, the number of ways a batch is split.")


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ``AXES``; ``(1, 1, 1)`` is the first device alone."""
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
