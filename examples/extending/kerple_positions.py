"""A new position scheme in one file: KERPLE's logarithmic kernel (Chi et al., NeurIPS 2022,
"KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation").

Each head ``n`` adds ``-r1_n * log(1 + r2_n * |i - j|)`` to its attention logits, with
``r1_n, r2_n > 0`` learned (kept positive by a softplus). Like ALiBi it has no table of absolute
positions, so it runs at any length; unlike ALiBi the penalty grows logarithmically and its
shape is learned per head. It is a learned score modifier (``kernels.score_mods``): it declares
its raw ``r1, r2``, each attention layer creates and owns its own, and every implementation
(the ``xla`` reference, the Pallas flash and paged kernels, gradients included) applies it at
the positions it sees. Registered as ``kerple``:

  python experiments/train.py --config=examples/extending/kerple_positions.py \
      --workdir=/tmp/tx/kerple  # --config.model.implementation=pallas: our kernels alone
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tx.kernels import score_mods
from tx import flags
from tx.layers.positions import Positions
from tx.train.configs import experiment


@dataclasses.dataclass(frozen=True, eq=False)
class KerpleLog(score_mods.ScoreMod):
    """The modifier; unbound it declares per-head raw ``r1_raw, r2_raw [N]`` (layer params)."""

    r1_raw: Any = None
    r2_raw: Any = None
    width = 2  # parameter columns per head: softplus(r1_raw), softplus(r2_raw)
    relative = True  # reads |q_pos - kv_pos| only

    def learned(self, num_heads):
        # softplus(raw): r1 starts in [0.31, 0.69), r2 in [0.69, 1.31), a mild decay.
        return {} if self.r1_raw is not None else {
            name: score_mods.ParamSpec((num_heads,), lambda key, shape, dtype, low=low:
                                       jax.random.uniform(key, shape, dtype, low, low + 1.0))
            for name, low in (("r1_raw", -1.0), ("r2_raw", 0.0))}

    def head_params(self, num_heads):
        return jax.nn.softplus(jnp.stack([self.r1_raw, self.r2_raw], 1).astype(jnp.float32))

    def modify(self, s, ctx):
        distance = jnp.abs(ctx.q_pos - ctx.kv_pos).astype(jnp.float32)
        return s - ctx.param(0) * jnp.log1p(ctx.param(1) * distance)


class KerplePositions(Positions):
    def score_mod(self):  # no parameters here: the modifier each layer binds to its own
        return KerpleLog()


@dataclasses.dataclass(frozen=True)
class Kerple:
    """The config's value: builds the tower's ``KerplePositions``."""

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return KerplePositions()


flags.register_positions("kerple", lambda f: Kerple(), prints=lambda v: type(v) is Kerple and {})


def get_config():
    # MQAR needs no absolute positions; the learned decay lets each head choose how local it is.
    model = flags.ModelFlags(task="lm", vocab_size=40, d_model=64, num_layers=2, num_heads=4,
                             d_ff=128, positions="kerple")
    return experiment(model, dataset="mqar", seq_len=48, extensions=[__file__],
                      options=dict(num_kv_pairs=4, num_keys=8, num_values=8), steps=400,
                      batch_size=64, warmup_steps=30, weight_decay=0.0, log_every=20,
                      eval_every=100, eval_batches=4, checkpoint_every=200)
