"""Task losses: one function per task, each ``(model, batch) -> (loss, metrics)``.

Batches are dicts of arrays with the keys documented in ``tx.data``. Losses are fp32 means
over weighted tokens; metrics are sums and counts so they aggregate exactly across steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _token_loss(logits_btv, targets_bt, weights_bt):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    weights = weights_bt.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    correct = (logits_btv.argmax(-1) == targets_bt).astype(jnp.float32)
    metrics = {"loss_sum": (ce * weights).sum(), "correct": (correct * weights).sum(),
               "count": weights.sum()}
    return (ce * weights).sum() / count, metrics


def _packing(batch):
    return {"segment_ids_bt": batch.get("segment_ids"), "positions_bt": batch.get("positions")}


def lm_loss(model, batch):
    logits = model(batch["inputs"], **_packing(batch))
    return _token_loss(logits, batch["targets"], batch["weights"])


def mlm_loss(model, batch):
    logits = model(batch["inputs"], lengths_b=batch.get("lengths"), **_packing(batch))
    return _token_loss(logits, batch["targets"], batch["weights"])


token_cls_loss = mlm_loss


def seq_cls_loss(model, batch):
    logits_bc = model(batch["inputs"], lengths_b=batch.get("lengths"))
    labels = batch["labels"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_bc, labels)
    correct = (logits_bc.argmax(-1) == labels).astype(jnp.float32)
    count = jnp.float32(labels.shape[0])
    return ce.mean(), {"loss_sum": ce.sum(), "correct": correct.sum(), "count": count}


def seq2seq_loss(model, batch):
    logits = model(batch["source"], batch["inputs"], source_lengths_b=batch.get("source_lengths"))
    return _token_loss(logits, batch["targets"], batch["weights"])


LOSSES = {"lm": lm_loss, "mlm": mlm_loss, "token_cls": token_cls_loss,
          "seq_cls": seq_cls_loss, "seq2seq": seq2seq_loss}


def loss_fn(model, batch) -> tuple[jax.Array, dict]:
    return LOSSES[model.config.task](model, batch)
