"""Training: losses per task, the jitted train/eval steps, the loop with checkpoints and
resume (``run``), evaluation, and the ablation runner (``ablate``)."""

from tx.train.losses import loss_fn
from tx.train.step import (TrainState, create_state, init_state, make_eval_step,
                           make_train_step, state_shardings)


def run(config, workdir, **kwargs):
    """Trains ``config`` in ``workdir``; see :func:`tx.train.loop.run`."""
    from tx.train import loop  # deferred: orbax and tensorboardX load only when training
    return loop.run(config, workdir, **kwargs)


def ablate(config, workdir, **kwargs):
    """Runs ``config.sweep``; see :func:`tx.train.ablation.ablate`."""
    from tx.train import ablation
    return ablation.ablate(config, workdir, **kwargs)


__all__ = ["loss_fn", "TrainState", "init_state", "create_state", "state_shardings",
           "make_train_step", "make_eval_step", "run", "ablate"]
