"""The training loss: the config's head owns it (``tx.models.heads``).

``loss_fn(model, batch) -> (loss, metrics)``; batches are dicts of arrays with the keys
documented in ``tx.data`` and named by the head's ``batch_keys``.
"""

from __future__ import annotations

import jax

from tx.models.heads import class_loss, token_loss


def loss_fn(model, batch) -> tuple[jax.Array, dict]:
    return model.config.head.loss(model, batch)


__all__ = ["class_loss", "loss_fn", "token_loss"]
