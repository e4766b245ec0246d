"""A new head and its dataset in one file: extractive span prediction (SQuAD-style).

``SpanHead`` builds an encoder with ``[B, T, 2]`` start/end logits and owns its loss, the mean
cross-entropy of the start and the end over each row's valid tokens (``accuracy``: exact
spans). ``span_copy``: random symbols with an ``OPEN ... CLOSE`` pair of markers; the answer is
the tokens between them. Registered as the task ``span`` and the dataset ``span_copy``:

  python experiments/train.py --config=examples/extending/span_head.py --workdir=/tmp/tx/span
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tx import data, flags
from tx.data.common import check_int
from tx.data.vocab import OFFSET, PAD
from tx.models.encoder import TokenClassifier
from tx.train.configs import experiment

OPEN, CLOSE = OFFSET, OFFSET + 1  # the markers; ordinary symbols follow them


@dataclasses.dataclass(frozen=True)
class SpanHead:
    causal, generates = False, False  # a bidirectional encoder; nothing to decode
    batch_keys = ("inputs", "start", "end", "lengths")
    num_classes, bias = 2, False  # read by TokenClassifier: two logits a token, start/end

    def build(self, cfg, *, rngs: nnx.Rngs) -> TokenClassifier:
        return TokenClassifier(cfg, rngs=rngs)  # tokens [B, T] -> logits [B, T, 2]

    def loss(self, model, batch):
        logits = model(batch["inputs"], lengths_b=batch["lengths"])  # [B, T, 2]
        valid = jnp.arange(logits.shape[1])[None, :] < batch["lengths"][:, None]
        logits = jnp.where(valid[:, :, None], logits, -1e9).transpose(0, 2, 1)  # [B, 2, T]
        labels = jnp.stack([batch["start"], batch["end"]], axis=1)  # [B, 2]
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(-1)
        exact = (logits.argmax(-1) == labels).all(-1).astype(jnp.float32)
        return per_row.mean(), {"loss_sum": per_row.sum(), "correct": exact.sum(),
                                "count": jnp.float32(labels.shape[0])}


class SpanCopy(data.SyntheticTask):
    """Rows of ``seq_len // 2 .. seq_len`` tokens; ``start``/``end`` (inclusive) delimit the
    tokens strictly between ``OPEN`` and ``CLOSE``."""

    task = "span"

    def __init__(self, *, batch_size, seq_len, seed=0, split="train", num_symbols=16):
        super().__init__(batch_size=batch_size, seq_len=check_int("seq_len", seq_len, 4),
                         seed=seed, split=split)
        self.vocab_size = OFFSET + 2 + check_int("num_symbols", num_symbols, 2)

    def _sample(self, rng, n):
        rows, width = np.arange(n), self.seq_len
        lengths = rng.integers(max(4, width // 2), width + 1, n)
        opened = rng.integers(0, lengths - 2)  # OPEN in [0, L - 3], CLOSE in [OPEN + 2, L)
        closed = opened + 1 + rng.integers(1, lengths - opened - 1)
        inputs = rng.integers(OFFSET + 2, self.vocab_size, (n, width))
        inputs[rows, opened], inputs[rows, closed] = OPEN, CLOSE
        inputs = np.where(np.arange(width)[None] < lengths[:, None], inputs, PAD)
        return {"inputs": inputs.astype(np.int32), "start": (opened + 1).astype(np.int32),
                "end": (closed - 1).astype(np.int32), "lengths": lengths.astype(np.int32)}


flags.register_head("span", lambda f: SpanHead())
data.register_dataset("span_copy", SpanCopy, options=("num_symbols",))


def get_config():
    model = flags.ModelFlags(task="span", vocab_size=32, d_model=64, num_layers=2, num_heads=4,
                             d_ff=128)
    return experiment(model, dataset="span_copy", seq_len=32, extensions=[__file__],
                      steps=200, batch_size=32,
                      warmup_steps=20, log_every=20, eval_every=100, checkpoint_every=100)
