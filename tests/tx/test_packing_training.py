"""Packing is exact: per-document losses and gradients equal those of one document per row."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tx import models
from tx.flags import model_config
from tx.data import pack

V = 48


def _per_document_loss(model, batch):
    logits = model(jnp.asarray(batch["inputs"]), segment_ids_bt=jnp.asarray(batch["segment_ids"]),
                   positions_bt=jnp.asarray(batch["positions"]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"]))
    ce = ce * jnp.asarray(batch["weights"])
    doc = jnp.asarray(batch["document_ids"])  # -1 on padding, whose weight is 0 anyway
    return jax.ops.segment_sum(ce.reshape(-1), jnp.maximum(doc, 0).reshape(-1), num_segments=5)


def test_packed_rows_give_the_per_document_loss_of_one_per_row():
    rng = np.random.default_rng(0)
    docs = [rng.integers(8, V, n) for n in (5, 9, 3, 12, 6)]
    packed = pack(docs, 16, strategy="first_fit", return_provenance=True)
    single = pack(docs, 16, strategy="none", return_provenance=True)
    assert packed["inputs"].shape[0] < single["inputs"].shape[0]  # really packed
    cfg = model_config(vocab_size=V, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                      attention="gqa", positions="rope")
    model = models.build(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_and_docs(p, batch):
        per_doc = _per_document_loss(nnx.merge(graphdef, p, rest, copy=True), batch)
        return per_doc.sum(), per_doc

    value_and_grad = jax.jit(jax.value_and_grad(loss_and_docs, has_aux=True))
    (total_p, docs_p), grads_p = value_and_grad(params, packed)
    (total_s, docs_s), grads_s = value_and_grad(params, single)
    np.testing.assert_allclose(docs_p, docs_s, rtol=1e-5, atol=1e-5)
    assert float(total_p) > 0
    for gp, gs in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(gp, gs, rtol=1e-4, atol=1e-5)
