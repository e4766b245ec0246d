"""Evaluates the latest (or a given) checkpoint of a workdir on the eval split.

  python experiments/evaluate.py --workdir=/tmp/tx/lm [--config=configs/decoder_lm.py] [--step=200]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tx.train import loop
from tx.train.configs import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (default: the "
                                          "config saved in the workdir).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCHES = flags.DEFINE_integer("batches", None, "Eval batches (default: train.eval_batches).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        out = loop.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                            batches=_BATCHES.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in out.items()))


if __name__ == "__main__":
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # config_flags: a misspelled --config.* key
        sys.exit(f"error: the config has no field {e}; check the spelling of --config.* flags.")
