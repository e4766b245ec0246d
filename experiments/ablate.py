"""The ablation runner: trains one variant per value of ``sweep.field`` (same seed, same data
order) and writes results.md, results.csv and loss_curves.png to the workdir.

  python experiments/ablate.py --workdir=/tmp/tx/ablation            # configs/ablation.py
  python experiments/ablate.py --config=configs/decoder_lm.py ...    # needs a sweep section:
  python experiments/ablate.py --workdir=/tmp/tx/heads \
      --config.sweep.field=model.num_kv_heads --config.sweep.choices=1,2,4
"""

import os

from experiments import _cli
from absl import flags
from ml_collections import config_flags

from tx.train import ablation

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                        "ablation.py")
_CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT),
                                          "A config with a `sweep` section.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per "
                               "variant).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors():
        ablation.ablate(_CONFIG.value, _WORKDIR.value)
    print(f"results: {os.path.join(_WORKDIR.value, 'results.md')}")


def cli() -> None:
    """The console entry point (``tx-ablate``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
