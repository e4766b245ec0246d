"""Training: losses per task, the jitted train/eval steps."""

from tx.train.losses import LOSSES, loss_fn
from tx.train.step import TrainState, init_state, make_eval_step, make_train_step

__all__ = ["LOSSES", "loss_fn", "TrainState", "init_state", "make_train_step",
           "make_eval_step"]
