"""LayerNorm / RMSNorm factory with logically partitioned parameters."""
import jax.numpy as jnp
from flax import nnx

NORMS = ('layernorm', 'rmsnorm')


def _embed_axis(init):
    # eager_sharding=False: 'embed' is a logical name, mapped to mesh axes later.
    return nnx.with_partitioning(init, ('embed',), eager_sharding=False)


def make_norm(kind: str, d_model: int, *, eps: float = 1e-6, dtype=jnp.float32,
              param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """Returns `nnx.LayerNorm` or `nnx.RMSNorm` over the last axis (D).

    Statistics are computed in float32 even for bf16 inputs: flax's `_compute_stats`
    promotes its input to at least float32 and `_normalize` subtracts/scales in that
    promoted dtype, casting only the result to `dtype` (checked in tests).
    """
    common = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  scale_init=_embed_axis(nnx.initializers.ones_init()))
    if kind == 'layernorm':
        return nnx.LayerNorm(d_model, bias_init=_embed_axis(nnx.initializers.zeros_init()),
                             **common)
    if kind == 'rmsnorm':
        return nnx.RMSNorm(d_model, **common)
    raise ValueError(f"norm kind {kind!r} is not supported; use one of {NORMS}")
