"""What every experiment script does around its one tx call: reject stray arguments, keep
Orbax's per-save INFO logs quiet, turn config and checkpoint errors into one line, and exit
with :data:`tx.train.preemption.EXIT_CODE` when a signal stopped a run after saving."""

import contextlib
import os
import sys

from absl import app, flags, logging

from tx.train.checkpoint import CheckpointError
from tx.train.configs import ConfigError
from tx.train.preemption import Preempted


def start(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def one_line_errors(*kinds):
    """Exits with ``error: ...`` on a ConfigError, a CheckpointError (and any of ``kinds``),
    no traceback; a preempted run prints where it stopped and exits with its own code."""
    try:
        yield
    except Preempted as e:
        _leave(str(e), e.exit_code)
    except (ConfigError, CheckpointError, *kinds) as e:
        _leave(f"error: {e}", 1)


def _leave(line: str, code: int) -> None:
    """Prints ``line`` and exits now. ``os._exit``: a failed Orbax save can leave non-daemon
    threads behind that would keep the interpreter alive; everything of ours is already
    closed and flushed by the time an error gets here."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def run(main) -> None:
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # config_flags: a misspelled --config.* key
        sys.exit(f"error: the config has no field {e}; check the spelling of --config.* flags.")
