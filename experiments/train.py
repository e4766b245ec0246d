"""Trains and evaluates one config; rerunning the same command resumes from the latest checkpoint.

  python experiments/train.py --config=configs/decoder_lm.py --workdir=/tmp/tx/lm \
      --config.model.attention=gqa --config.train.steps=500
"""

from experiments import _cli
from absl import flags
from ml_collections import config_flags

from tx.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors():
        summary = loop.run(_CONFIG.value, _WORKDIR.value)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in summary.items()))


def cli() -> None:
    """The console entry point (``tx-train``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
