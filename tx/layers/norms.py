"""LayerNorm / RMSNorm: a factory with logically partitioned parameters, and the config values
`RMSNorm(eps, pre)` / `LayerNorm(eps, pre)` that build them."""
import dataclasses

import jax
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
    if kind not in _BUILDERS:
        raise ValueError(f"norm kind {kind!r} is not supported; use one of {NORMS}")
    common = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  scale_init=_embed_axis(nnx.initializers.ones_init()))
    return _BUILDERS[kind](d_model, common)


# Flax's norms promote half-precision statistics to fp32 on purpose (jnp.promote_types), which
# jax_numpy_dtype_promotion='strict' forbids; the promotion is scoped to them, so every other
# mixed-dtype operation in a model still fails loudly under strict tests.
class _StandardPromotion:
    def __call__(self, x, mask=None):
        with jax.numpy_dtype_promotion("standard"):
            return super().__call__(x, mask=mask)


class _LayerNorm(_StandardPromotion, nnx.LayerNorm):
    pass


class _RMSNorm(_StandardPromotion, nnx.RMSNorm):
    pass


def _layernorm(d_model, common):
    return _LayerNorm(d_model, bias_init=_embed_axis(nnx.initializers.zeros_init()), **common)


def _rmsnorm(d_model, common):
    return _RMSNorm(d_model, **common)


_BUILDERS = {'layernorm': _layernorm, 'rmsnorm': _rmsnorm}


# -- values: the config's leaves ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Norm:
    eps: float = 1e-6
    pre: bool = True  # normalise each sub-layer's input (pre-norm), else its residual sum
    kind = ''

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"norm.eps={self.eps!r}: must be a positive float, e.g. 1e-6.")

    def build(self, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
        return make_norm(self.kind, d_model, eps=self.eps, dtype=dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class RMSNorm(_Norm):
    """RMSNorm everywhere; ``pre=False`` is post-norm (the original Transformer, BERT)."""

    kind = 'rmsnorm'


@dataclasses.dataclass(frozen=True)
class LayerNorm(_Norm):
    """LayerNorm (with a bias) everywhere; ``pre=False`` is post-norm."""

    kind = 'layernorm'
