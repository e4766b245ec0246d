"""Attention maps of a model on one input, for a PNG grid (``plots.attention_grid``).

Every attention layer is switched (NNX attribute assignment) to a registry entry that records
``kernels.reference.attention_weights`` of the q and k it receives (after RoPE, with its mask,
bias, segment ids and lengths) and then computes the reference attention. The model is left as
it was afterwards.
"""

from __future__ import annotations

import contextlib

import numpy as np
from flax import nnx

from tx.kernels import reference
from tx.attention import Attention
from tx.attention import registry

_CAPTURE = "tx_capture_weights"


@contextlib.contextmanager
def capture_attention(model: nnx.Module):
    """Yields a list that fills with one ``[B, N, T, S]`` weight array per attention call."""
    captured: list[np.ndarray] = []

    def capture(q, k, v, **kwargs):
        captured.append(np.asarray(reference.attention_weights(q, k, **kwargs)))
        return reference.attention(q, k, v, **kwargs)

    registry.register(_CAPTURE, capture)
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, Attention)]
    saved = [layer.implementation for layer in layers]
    for layer in layers:
        layer.implementation = (_CAPTURE,)
    try:
        yield captured
    finally:
        for layer, impl in zip(layers, saved):
            layer.implementation = impl


def complete_batch(head, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with the keys ``head.batch_keys`` names that it lacks (a ``--text`` input has
    ``inputs`` only): ``source`` is the inputs, targets and labels are zeros, weights ones.
    The head's loss reads them, but the attention weights depend on the inputs alone."""
    inputs = np.asarray(batch["inputs"] if "inputs" in batch else batch["source"])
    fill = {"inputs": lambda: inputs, "source": lambda: inputs,
            "targets": lambda: np.zeros_like(inputs),
            "weights": lambda: np.ones(inputs.shape, np.float32),
            "labels": lambda: np.zeros(inputs.shape[:1], np.int32)}
    out = dict(batch)
    for key in getattr(head, "batch_keys", ()):
        if key not in out and key in fill:
            out[key] = fill[key]()
    return out


def attention_maps(model: nnx.Module, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``[N, T, S]`` weights of the first example, one per attention call in call order;
    ``batch`` may hold the inputs only (see :func:`complete_batch`)."""
    model.eval()
    batch = complete_batch(model.config.head, batch)
    first = {key: value[:1] for key, value in batch.items()}
    with capture_attention(model) as captured:
        model.config.head.loss(model, first)  # the head knows how its model reads a batch
    return [w[0] for w in captured]
