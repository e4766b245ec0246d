"""The ablation runner: trains one variant per value of ``sweep.field`` (same seed, same data
order) and writes results.md, results.csv and loss_curves.png to the workdir.

  python experiments/ablate.py --workdir=/tmp/tx/ablation            # tx:ablation
  python experiments/ablate.py --config=configs/decoder_lm.py ...    # needs a sweep section:
  python experiments/ablate.py --workdir=/tmp/tx/heads \
      --config.sweep.field=model.num_kv_heads --config.sweep.choices=1,2,4
"""

import os

from tx.experiments import _cli
from absl import flags
from ml_collections import config_flags

from tx.research import ablation

_DEFAULT = "tx:ablation"  # configs/ablation.py, installed with tx
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"A config with a `sweep` or `variants` section: a file or tx:NAME[:ARG] "
    f"(default: {_DEFAULT}).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per "
                               "variant).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, _cli.PRINT_CONFIG_HELP)


def main(argv):
    _cli.start(argv)
    if _PRINT_CONFIG.value:
        return _cli.print_config(_CONFIG.value)
    workdir = _cli.required(_WORKDIR, "give --workdir=<the ablation's output directory>.")
    with _cli.one_line_errors():
        ablation.ablate(_CONFIG.value, workdir)
    print(f"results: {os.path.join(workdir, 'results.md')}")


def cli() -> None:
    """The console entry point (``tx-ablate``)."""
    _cli.run(main, default_config=_DEFAULT)


if __name__ == "__main__":
    cli()
