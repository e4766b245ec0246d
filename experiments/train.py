"""Trains and evaluates one config; rerunning the same command resumes from the latest checkpoint.

  python experiments/train.py --config=configs/decoder_lm.py --workdir=/tmp/tx/lm \
      --config.model.attention=gqa --config.train.steps=500
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tx.train import loop
from tx.train.configs import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        summary = loop.run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in summary.items()))


if __name__ == "__main__":
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # config_flags: a misspelled --config.* key
        sys.exit(f"error: the config has no field {e}; check the spelling of --config.* flags.")
