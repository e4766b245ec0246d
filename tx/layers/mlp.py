"""Position-wise feed-forward block: plain (relu, gelu, gelu_exact) or gated (swiglu, geglu).

`MLPConfig(d_ff, activation, gated, bias)` is the config's value; the activation is a function,
so a research file passes its own (`MLPConfig(1024, activation=my_act)`).
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tx import parallel
from tx.registry import Registry

# 'gelu' is the tanh approximation (jax default), as in GPT-2 and T5's gated-gelu;
# 'gelu_exact' is the erf form BERT was trained with (the two differ by up to ~1e-3).
gelu_exact = functools.partial(jax.nn.gelu, approximate=False)
# name -> (function, gated); a research file adds its own with ACTIVATIONS.register.
ACTIVATIONS = Registry("activation", "activation",
                       register_hint="tx.layers.mlp.ACTIVATIONS.register(name, (fn, gated))")
for _name, _spec in (('relu', (jax.nn.relu, False)), ('gelu', (jax.nn.gelu, False)),
                     ('gelu_exact', (gelu_exact, False)), ('swiglu', (jax.nn.silu, True)),
                     ('geglu', (jax.nn.gelu, True))):
    ACTIVATIONS.register(_name, _spec)


def _dense(d_in, d_out, axes, *, use_bias, dtype, param_dtype, rngs):
    # eager_sharding=False: logical axis names, mapped to a mesh later by axis rules.
    kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes,
                                        eager_sharding=False)
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:],
                                      eager_sharding=False)
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


class MLP(nnx.Module):
    """`[B, T, D] -> [B, T, D]`. Gated variants (Shazeer 2020) compute
    `act(x W_gate) * (x W_up)` with two `[D, F]` projections; dropout follows the
    activation, controlled by `model.train()` / `model.eval()`."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str | Callable = 'gelu',
                 gated: bool = False, dropout_rate: float = 0.0, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(activation, str):  # a name: its function, gated or not
            activation, gated = ACTIVATIONS[activation]  # an unknown name lists the choices
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.wi_gate = _dense(d_model, d_ff, ('embed', 'mlp'), **dense)
        self.wi_up = _dense(d_model, d_ff, ('embed', 'mlp'), **dense) if gated else None
        self.wo = _dense(d_ff, d_model, ('mlp', 'embed'), **dense)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        # The projections see 2-D [B*T, D] rows: XLA's CPU backward of a dot that contracts
        # two batch axes (the weight gradient) transposes the activations first (1.7x slower
        # on the LLaMA block); the reshapes are free.
        lead = x_btd.shape[:-1]
        x_md = x_btd.reshape(-1, x_btd.shape[-1])
        h_mf = self.activation(self.wi_gate(x_md))
        if self.wi_up is not None:
            h_mf = h_mf * self.wi_up(x_md)
        # Hidden units over tensor.
        h_btf = parallel.constrain(h_mf.reshape(*lead, -1), ('batch', None, 'mlp'))
        h_mf = self.dropout(h_btf).reshape(-1, h_btf.shape[-1])
        return parallel.constrain(self.wo(h_mf).reshape(x_btd.shape), ('batch', None, 'embed'))


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """The MLP of every block: `d_ff` hidden units, `activation(x W)` or, when `gated`,
    `activation(x W_gate) * (x W_up)`; `bias` on every projection (GPT-2, BERT)."""

    d_ff: int
    activation: Callable = jax.nn.gelu
    gated: bool = False
    bias: bool = False

    def __post_init__(self):
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise ValueError(f"mlp.d_ff={self.d_ff!r}: must be a positive integer.")
        if not callable(self.activation):
            raise ValueError(f"mlp.activation={self.activation!r}: give a function such as "
                             "jax.nn.silu.")

    def build(self, d_model: int, *, dropout_rate: float = 0.0, dtype=jnp.float32,
              rngs: nnx.Rngs) -> MLP:
        return MLP(d_model, self.d_ff, activation=self.activation, gated=self.gated,
                   dropout_rate=dropout_rate, use_bias=self.bias, dtype=dtype, rngs=rngs)
