"""LayerNorm / RMSNorm: a factory with logically partitioned parameters, and the config values
`RMSNorm(eps, pre, sandwich, unit_offset)` / `LayerNorm(eps, pre, sandwich)` that build them."""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tx.registry import Field, Registry, positive_float


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
    build = MODULES[kind]  # an unknown kind fails here, naming the choices
    common = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  scale_init=_embed_axis(nnx.initializers.ones_init()))
    return build(d_model, common)


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


MODULES = Registry("norm module", "norm kind")
MODULES.register('layernorm', _layernorm)
MODULES.register('rmsnorm', _rmsnorm)


class UnitOffsetRMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` with ``scale`` initialised at 0, computed
    in fp32 and cast to ``dtype`` only at the end (Gemma multiplies before the cast; LLaMA's
    norm casts first). Kept in Gemma's parameterisation, so weight decay pulls the gain
    towards 1 as it does for Gemma, and checkpoints map without arithmetic."""

    def __init__(self, d_model: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = _embed_axis(nnx.initializers.zeros_init())
        self.scale = nnx.Param(init(rngs.params(), (d_model,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_btd: jax.Array, mask=None) -> jax.Array:
        x = x_btd.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        gain = (1.0 + self.scale[...].astype(jnp.float32)).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * gain).astype(self.dtype)


# -- values: the config's leaves ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Norm:
    eps: float = 1e-6
    pre: bool = True  # normalise each sub-layer's input (pre-norm), else its residual sum
    # With pre: also normalise each sub-layer's output before it joins the residual,
    # ``x + norm_out(f(norm_in(x)))`` (Gemma 2's "sandwich" norms).
    sandwich: bool = False
    kind = ''

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"norm.eps={self.eps!r}: must be a positive float, e.g. 1e-6.")
        if self.sandwich and not self.pre:
            raise ValueError(f"norm.sandwich={self.sandwich!r}: sandwich norms wrap each "
                             "sub-layer of a pre-norm block; set pre=True, or sandwich=False "
                             "for post-norm.")

    def build(self, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
        return make_norm(self.kind, d_model, eps=self.eps, dtype=dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class RMSNorm(_Norm):
    """RMSNorm everywhere; ``pre=False`` is post-norm (the original Transformer, BERT);
    ``unit_offset`` scales by ``1 + w`` with ``w`` from 0, in fp32 (Gemma)."""

    unit_offset: bool = False
    kind = 'rmsnorm'

    def build(self, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
        if self.unit_offset:
            return UnitOffsetRMSNorm(d_model, eps=self.eps, dtype=dtype, rngs=rngs)
        return super().build(d_model, dtype=dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class LayerNorm(_Norm):
    """LayerNorm (with a bias) everywhere; ``pre=False`` is post-norm."""

    kind = 'layernorm'


# -- flag names (tx.flags): the norm of every block, and the fields each reads ------------------
def _check_flags(f) -> None:
    if f.sandwich_norm and not f.pre_norm:
        raise ValueError(f"sandwich_norm={f.sandwich_norm!r}: wraps the sub-layers of a "
                         "pre-norm block; set pre_norm=True, or sandwich_norm=False.")
    if f.norm_unit_offset and f.norm != "rmsnorm":
        raise ValueError(f"norm_unit_offset={f.norm_unit_offset!r}: is an rmsnorm option "
                         f"(Gemma), not one of norm={f.norm!r}; set norm='rmsnorm' or leave it "
                         "False.")


NORMS = Registry("norm", "norm", register_hint="tx.layers.norms.NORMS.register(name, fn, "
                 "fields=...)", check=_check_flags, fields=(
    Field("norm_eps", 1e-6, "epsilon of every LayerNorm / RMSNorm", check=positive_float),
    Field("pre_norm", True, "normalise each sub-layer's input (False: post-norm, BERT)"),
    Field("sandwich_norm", False, "also normalise each sub-layer's output (Gemma 2; needs "
          "pre_norm)")))


def _common(v) -> dict:
    return dict(norm_eps=v.eps, pre_norm=v.pre, sandwich_norm=v.sandwich)


NORMS.register("rmsnorm", lambda f: RMSNorm(f.norm_eps, f.pre_norm, f.sandwich_norm,
                                            f.norm_unit_offset),
               fields=(Field("norm_unit_offset", False, "rmsnorm scales by 1 + w, w from 0, in "
                             "fp32 (Gemma)"),),
               prints=lambda v: type(v) is RMSNorm and dict(
                   _common(v), norm_unit_offset=v.unit_offset))
NORMS.register("layernorm", lambda f: LayerNorm(f.norm_eps, f.pre_norm, f.sandwich_norm),
               prints=lambda v: type(v) is LayerNorm and _common(v))
