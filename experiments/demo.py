"""Trains the default tiny decoder for a few steps on built-in text and prints the loss.

  python experiments/demo.py --steps=60
"""

import tx.experiments  # noqa: F401  (keeps freed host memory for XLA: experiments/__init__.py)
from absl import app, flags

from tx.research import demo

_STEPS = flags.DEFINE_integer("steps", 60, "Training steps.")
_ATTENTION = flags.DEFINE_string("attention", "gqa", "Attention preset, e.g. mha, gqa+local.")


def main(argv):
    del argv
    demo.run(steps=_STEPS.value, attention=_ATTENTION.value)


if __name__ == "__main__":
    app.run(main)
