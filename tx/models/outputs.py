"""Output modules: vocabulary logits (tied or separate), poolers and classifiers.

The head values that choose among them (and own the losses) are in ``tx.models.heads``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tx.layers import Embed


def _dense(d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs, *,
           use_bias: bool = False) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names, eager_sharding=False)
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:],
                                      eager_sharding=False)
    return nnx.Linear(d_in, d_out, kernel_init=init, bias_init=bias_init, use_bias=use_bias,
                      rngs=rngs)


class HeadTransform(nnx.Module):
    """``norm(act(dense(x)))``, ``[B, T, D] -> [B, T, D]``: BERT's MLM prediction transform."""

    def __init__(self, d_model: int, activation, norm, *, rngs: nnx.Rngs):
        self.dense = _dense(d_model, d_model, ("embed", "mlp"), rngs, use_bias=True)
        self.act = activation
        self.norm = norm.build(d_model, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.norm(self.act(self.dense(x_btd.astype(jnp.float32))))


class VocabHead(nnx.Module):
    """``[B, T, D] -> [B, T, V]`` fp32 logits, through the embedding table when tied.

    Optional, for imported models: a ``transform`` before the projection and an output
    ``bias`` (BERT), a ``scale`` on the hidden state (T5 with tied embeddings: ``D ** -0.5``),
    a ``softcap`` bounding the logits to ``(-cap, cap)`` (Gemma 2).
    """

    def __init__(self, embed: Embed, d_model: int, vocab_size: int, *, tied: bool,
                 rngs: nnx.Rngs, transform: nnx.Module | None = None, use_bias: bool = False,
                 scale: float = 1.0, softcap: float | None = None):
        self.embed = embed if tied else None
        self.proj = None if tied else _dense(d_model, vocab_size, ("embed", "vocab"), rngs)
        self.transform = transform
        init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",),
                                     eager_sharding=False)
        self.bias_v = nnx.Param(init(rngs.params(), (vocab_size,), jnp.float32)) \
            if use_bias else None
        self.scale = scale
        self.softcap = softcap

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        if self.transform is not None:
            x_btd = self.transform(x_btd)
        if self.scale != 1.0:
            x_btd = x_btd * self.scale
        if self.embed is not None:
            logits = self.embed.attend(x_btd)
        else:  # 2-D rows, as in Embed.attend (a faster weight gradient on CPU)
            x_md = x_btd.reshape(-1, x_btd.shape[-1]).astype(jnp.float32)
            logits = self.proj(x_md).reshape(*x_btd.shape[:-1], -1)
        if self.bias_v is not None:
            logits = logits + self.bias_v[...][None, None, :]
        if self.softcap is not None:  # fp32, as the logits are
            logits = self.softcap * jnp.tanh(logits / self.softcap)
        return logits


class ClsPooler(nnx.Module):
    """``[B, T, D] -> [B, D]``: ``tanh(dense(h[:, 0]))``, BERT's pooler on the [CLS] token."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.dense = _dense(d_model, d_model, ("embed", "mlp"), rngs, use_bias=True)

    def __call__(self, h_btd: jax.Array, lengths_b: jax.Array | None = None) -> jax.Array:
        return jnp.tanh(self.dense(h_btd[:, 0].astype(jnp.float32)))


class MeanPooler(nnx.Module):
    """``[B, T, D] -> [B, D]``: the mean hidden state over each row's valid tokens."""

    def __call__(self, h_btd: jax.Array, lengths_b: jax.Array | None = None) -> jax.Array:
        b, t, _ = h_btd.shape
        h_btd = h_btd.astype(jnp.float32)
        lengths = jnp.full((b,), t, jnp.int32) if lengths_b is None else lengths_b
        valid_bt = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)
        return (h_btd * valid_bt[:, :, None]).sum(1) / jnp.maximum(valid_bt.sum(1), 1.0)[:, None]


class ClassHead(nnx.Module):
    """``[B, ..., D] -> [B, ..., C]`` fp32 logits."""

    def __init__(self, d_model: int, num_classes: int, *, rngs: nnx.Rngs,
                 use_bias: bool = False):
        self.proj = _dense(d_model, num_classes, ("embed", "classes"), rngs, use_bias=use_bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x.astype(jnp.float32))
