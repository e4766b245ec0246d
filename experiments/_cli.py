"""What every experiment script does around its one tx call: reject stray arguments, keep
Orbax's per-save INFO logs quiet, and turn config errors into one line naming the field."""

import contextlib
import sys

from absl import app, flags, logging

from tx.train.configs import ConfigError


def start(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def one_line_errors(*kinds):
    """Exits with ``error: ...`` on a ConfigError (and any of ``kinds``), no traceback."""
    try:
        yield
    except (ConfigError, *kinds) as e:
        sys.exit(f"error: {e}")


def run(main) -> None:
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # config_flags: a misspelled --config.* key
        sys.exit(f"error: the config has no field {e}; check the spelling of --config.* flags.")
