"""Output heads: vocabulary logits (tied or separate) and classifiers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.layers import Embed


def _dense(d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names, eager_sharding=False)
    return nnx.Linear(d_in, d_out, kernel_init=init, use_bias=False, rngs=rngs)


class VocabHead(nnx.Module):
    """``[B, T, D] -> [B, T, V]`` fp32 logits, through the embedding table when tied."""

    def __init__(self, embed: Embed, d_model: int, vocab_size: int, *, tied: bool,
                 rngs: nnx.Rngs):
        self.embed = embed if tied else None
        self.proj = None if tied else _dense(d_model, vocab_size, ("embed", "vocab"), rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        if self.embed is not None:
            return self.embed.attend(x_btd)
        return self.proj(x_btd.astype(jnp.float32))


class ClassHead(nnx.Module):
    """``[B, ..., D] -> [B, ..., C]`` fp32 logits."""

    def __init__(self, d_model: int, num_classes: int, *, rngs: nnx.Rngs):
        self.proj = _dense(d_model, num_classes, ("embed", "classes"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x.astype(jnp.float32))
