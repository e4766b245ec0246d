"""Training: losses per task, the jitted train/eval steps, the loop with checkpoints and
resume (``run``), evaluation, and reading run directories (``tx.train.workdir``).

The training core: ``step``, ``optim``, ``loop``, ``checkpoint``, ``integrity``,
``preemption``, ``lock``, ``metrics``, ``losses``, ``configs``; ``workdir`` reads a run
directory (its config, its parameters without optimizer state), ``evaluation`` scores
checkpoints, ``pretrained`` starts runs from pretrained weights. The research tools built on
it (ablations, crossover timing, plots, attention maps, the demo) live in :mod:`tx.research`.
"""

from tx.train.losses import loss_fn
from tx.train.step import (TrainState, create_state, init_state, make_eval_step,
                           make_train_step, state_shardings)


def run(config, workdir, **kwargs):
    """Trains ``config`` in ``workdir``; see :func:`tx.train.loop.run`."""
    from tx.train import loop  # deferred: orbax and tensorboardX load only when training
    return loop.run(config, workdir, **kwargs)


def ablate(config, workdir, **kwargs):
    """Runs ``config.sweep``; see :func:`tx.research.ablation.ablate`."""
    from tx.research import ablation
    return ablation.ablate(config, workdir, **kwargs)


# Modules that moved: ``from tx.train import ablation`` (etc.) still finds them.
_MOVED = {"ablation": "tx.research.ablation", "crossover": "tx.research.crossover",
          "plots": "tx.research.plots", "visualize": "tx.research.visualize",
          "demo": "tx.research.demo", "init": "tx.train.pretrained"}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module 'tx.train' has no attribute {name!r}")
    import importlib
    return importlib.import_module(_MOVED[name])


__all__ = ["loss_fn", "TrainState", "init_state", "create_state", "state_shardings",
           "make_train_step", "make_eval_step", "run", "ablate"]
