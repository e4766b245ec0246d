"""A new position scheme in one file: KERPLE's logarithmic kernel (Chi et al., NeurIPS 2022,
"KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation").

Each head ``n`` adds ``-r1_n * log(1 + r2_n * |i - j|)`` to its attention logits, with
``r1_n, r2_n > 0`` learned (kept positive by a softplus). Like ALiBi it has no table of absolute
positions, so it runs at any length; unlike ALiBi the penalty grows logarithmically and its
shape is learned per head. It uses one hook of ``tx.layers.positions.Positions``, ``bias``
(``embed`` and ``rotate`` stay the identity), and is registered as ``kerple``:

  python experiments/train.py --config=examples/extending/kerple_positions.py \
      --workdir=/tmp/tx/kerple  # add --config.model.positions=alibi for the baseline
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tx import flags
from tx.layers.positions import Positions
from tx.train.configs import experiment


class KerpleLog(Positions):
    """The module: per-head ``r1, r2`` as raw parameters, positive through a softplus."""

    def __init__(self, num_heads: int, *, rngs: nnx.Rngs):
        # softplus(raw): r1 starts in [0.31, 0.69), r2 in [0.69, 1.31), a mild decay.
        init = nnx.initializers.uniform(scale=1.0)
        self.r1_raw = nnx.Param(init(rngs.params(), (num_heads,)) - 1.0)
        self.r2_raw = nnx.Param(init(rngs.params(), (num_heads,)))

    def bias(self, q_pos_bt: jax.Array, kv_pos_bs: jax.Array) -> jax.Array:
        r1 = jax.nn.softplus(self.r1_raw[...]).astype(jnp.float32)[None, :, None, None]
        r2 = jax.nn.softplus(self.r2_raw[...]).astype(jnp.float32)[None, :, None, None]
        distance = jnp.abs(q_pos_bt[:, :, None] - kv_pos_bs[:, None, :]).astype(jnp.float32)
        return -r1 * jnp.log1p(r2 * distance[:, None])  # [B, N, T, S]


@dataclasses.dataclass(frozen=True)
class Kerple:
    """The config's value: builds one ``KerpleLog`` per tower (shared by its layers)."""

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return KerpleLog(cfg.num_heads, rngs=rngs)


flags.register_positions("kerple", lambda f: Kerple())


def get_config():
    # MQAR recall needs no absolute positions; the learned decay lets each head choose how
    # local it is. The bias is an additive term, so the XLA implementation serves it.
    model = flags.ModelFlags(task="lm", vocab_size=40, d_model=64, num_layers=2, num_heads=4,
                             d_ff=128, positions="kerple")
    return experiment(model, dataset="mqar", seq_len=48, extensions=[__file__],
                      options=dict(num_kv_pairs=4, num_keys=8, num_values=8), steps=400,
                      batch_size=64, warmup_steps=30, weight_decay=0.0, log_every=20,
                      eval_every=100, eval_batches=4, checkpoint_every=200)
