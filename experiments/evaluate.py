"""Evaluates the latest (or a given) checkpoint of a workdir on the eval split.

  python experiments/evaluate.py --workdir=/tmp/tx/lm [--config=configs/decoder_lm.py] [--step=200]
"""

from experiments import _cli
from absl import flags
from ml_collections import config_flags

from tx.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (default: the "
                                          "config saved in the workdir).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCHES = flags.DEFINE_integer("batches", None, "Eval batches (default: train.eval_batches).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors():
        out = loop.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                            batches=_BATCHES.value)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in out.items()))


def cli() -> None:
    """The console entry point (``tx-evaluate``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
