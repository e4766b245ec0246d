"""Scale-out on JAX's own machinery: a ``(data, fsdp, tensor, context)`` device mesh from the
config, logical-axis rules, sharded states and activations, and kernels run per shard.
Context parallelism (the sequence split) lives in ``tx.parallel.ring`` / ``ulysses`` /
``context``, imported where used (they import ``tx.attention``, which imports this package)."""

from tx.parallel.mesh import (AXES, BATCH_AXES, RULES, MeshConfig, initialize_distributed,
                              launched_on_many_hosts, make_mesh)
from tx.parallel.shard import (Parallel, active, constrain, put, put_batch, shard_module,
                               use)

__all__ = ["AXES", "BATCH_AXES", "RULES", "MeshConfig", "initialize_distributed",
           "launched_on_many_hosts", "make_mesh", "Parallel", "active",
           "constrain", "put", "put_batch", "shard_module", "use"]
