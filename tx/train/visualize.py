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

from kernels import reference
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


def attention_maps(model: nnx.Module, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``[N, T, S]`` weights of the first example, one per attention call in call order."""
    model.eval()
    first = {key: value[:1] for key, value in batch.items()}
    with capture_attention(model) as captured:
        model.config.head.loss(model, first)  # the head knows how its model reads a batch
    return [w[0] for w in captured]
