"""The ablation runner: trains one variant per value of ``sweep.field`` (same seed, same data
order) and writes results.md, results.csv and loss_curves.png to the workdir.

  python experiments/ablate.py --workdir=/tmp/tx/ablation            # configs/ablation.py
  python experiments/ablate.py --config=configs/decoder_lm.py ...    # needs a sweep section:
  python experiments/ablate.py --workdir=/tmp/tx/heads \
      --config.sweep.field=model.num_kv_heads --config.sweep.choices=1,2,4
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tx.train import ablation
from tx.train.configs import ConfigError

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                        "ablation.py")
_CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT),
                                          "A config with a `sweep` section.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per "
                               "variant).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        ablation.ablate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"results: {os.path.join(_WORKDIR.value, 'results.md')}")


if __name__ == "__main__":
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # config_flags: a misspelled --config.* key
        sys.exit(f"error: the config has no field {e}; check the spelling of --config.* flags.")
