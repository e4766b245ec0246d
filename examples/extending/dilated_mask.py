"""A new attention pattern in one file: a causal dilated sliding window.

``Dilated(window, dilation)``: key ``j`` is visible to query ``i`` iff ``0 <= i - j <
window * dilation`` and ``(i - j) % dilation == 0``, i.e. ``window`` keys spaced ``dilation``
apart (Longformer's dilated sliding window, causal). Its tile map is computed in closed form,
so the flash kernel skips every tile the window cannot reach without evaluating the predicate
over the ``T x S`` grid. Registered as ``dilated`` (``window`` keys, the ``stride`` flag as
the dilation). On CPU the kernel runs in the slow Pallas interpreter; add
``--config.model.implementation=xla`` there for a quick run:

  python experiments/train.py --config=examples/extending/dilated_mask.py \
      --workdir=/tmp/tx/dilated --config.model.window=8 --config.model.stride=4
"""

import dataclasses

import numpy as np

from tx.kernels import masks
from tx import flags
from tx.train.configs import experiment


@dataclasses.dataclass(frozen=True)
class Dilated(masks.Mask):
    window: int
    dilation: int = 1

    def __post_init__(self):
        for name in ("window", "dilation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Dilated.{name}={value!r} must be a positive integer.")

    @property
    def span(self) -> int:  # the largest visible distance i - j
        return (self.window - 1) * self.dilation

    def predicate(self, q_pos, kv_pos, kv_len):
        d = q_pos - kv_pos
        return (d >= 0) & (d <= self.span) & (d % self.dilation == 0)

    def band(self):  # exactly a band only without holes
        return (-self.span, 0) if self.dilation == 1 else None

    def tile_map(self, q_len, kv_len, block_q, block_k):
        # A tile's distances i - j fill [q0 - k1, q1 - k0] (in-range positions only); it is
        # non-empty iff that range meets a multiple of `dilation` in [0, span].
        q_pos, kv_pos = masks.aligned_positions(q_len, kv_len)
        q0, k0 = q_pos[::block_q].astype(np.int64), kv_pos[::block_k].astype(np.int64)
        q1, k1 = np.minimum(q0 + block_q - 1, q_pos[-1]), np.minimum(k0 + block_k - 1, kv_len - 1)
        d_min, d_max = q0[:, None] - k1[None, :], q1[:, None] - k0[None, :]
        lo, hi = np.maximum(d_min, 0), np.minimum(d_max, self.span)
        hit = -(-lo // self.dilation) * self.dilation <= hi  # first multiple >= lo
        full = hit & (d_min >= 0) & (d_max <= self.span) & (
            (self.dilation == 1) | (d_min == d_max))
        return np.where(full, masks.FULL, np.where(hit, masks.PARTIAL, masks.EMPTY)).astype(
            np.int8)


def _pattern(f: flags.ModelFlags, *, causal: bool) -> Dilated:
    if not causal:
        raise ValueError("layer_pattern 'dilated' is causal; use it in a decoder.")
    return Dilated(f.window, f.stride)


flags.register_pattern("dilated", _pattern)


def get_config():
    # Layer 0 sees 8 keys 4 apart, layer 1 all of the past; XLA serves what Pallas cannot.
    model = flags.ModelFlags(task="lm", vocab_size=40, d_model=64, num_layers=2, num_heads=4,
                             d_ff=128, layer_pattern=("dilated", "causal"), window=8, stride=4,
                             implementation=("pallas", "xla"))
    return experiment(model, dataset="mqar", seq_len=256, extensions=[__file__],
                      options=dict(num_kv_pairs=4, num_keys=8, num_values=8), steps=200,
                      batch_size=16, warmup_steps=20, weight_decay=0.0, log_every=20,
                      eval_every=100, eval_batches=2, checkpoint_every=100)
