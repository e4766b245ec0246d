"""Prefill of a long prompt with the sequence split over the ``context`` mesh axis.

A fresh contiguous cache attends the prompt over the whole cache (``max_len`` slots, the
unwritten ones masked): one device would hold all ``T x max_len`` logits. For the prompt's
one pass, :func:`prefill` wraps each decoding layer's cache so that it stores the prompt's
K/V as usual but attends the prompt over itself, which on an empty cache is the same
computation, through the ring or the all-to-all (``tx.parallel.context``); the cache then
holds the whole prompt and decoding continues through it unchanged.

The wrapper steps aside (the cache attends as usual) where that identity does not hold or
the split cannot run: cross-attention, segment ids or key lengths, a dense position bias, a
quantised cache (its prompt keys are read back quantised), or a prompt length the context
axis does not divide.
"""

from __future__ import annotations

import contextlib

from flax import nnx

from tx.attention import cache as cache_lib
from tx.attention import quant
from tx.parallel import shard as shard_lib


class _Prefill(nnx.Module):
    """A fresh cache's ``attend`` for the prompt: store, then attend the prompt alone."""

    def __init__(self, inner: nnx.Module, ways: int):
        self.inner = inner
        self.ways = ways  # the prompt length must divide into this many pieces

    def start(self):
        return self.inner.start()

    def attend(self, q_btnh, k_new, v_new, positions_bt=None, *, positions, cross=False,
               segment_ids=None, kv_lengths=None, **kwargs):
        unsplit = cross or segment_ids is not None or kv_lengths is not None or \
            q_btnh.shape[1] % self.ways or positions_bt is None or \
            positions.bias(positions_bt, positions_bt) is not None
        if unsplit:
            return self.inner.attend(q_btnh, k_new, v_new, positions_bt, positions=positions,
                                     cross=cross, segment_ids=segment_ids,
                                     kv_lengths=kv_lengths, **kwargs)
        self.inner.update(k_new, v_new)  # the cache holds the prompt's K/V
        if v_new is None:  # a latent cache (MLA): the values are the keys' first columns
            v_new = k_new[..., :self.inner.value_dim]
        return cache_lib.NO_CACHE.attend(q_btnh, k_new, v_new, positions_bt,
                                         positions=positions, **kwargs)


def _splittable(cache) -> bool:
    return isinstance(cache, (cache_lib.KVCache, cache_lib.RollingKVCache)) and \
        isinstance(cache.kv.key, quant.Float) and isinstance(cache.kv.value, quant.Float)


@contextlib.contextmanager
def prefill(layers):
    """While active, the fresh caches of ``layers`` (decoding attention layers) attend the
    prompt split over the active mesh's context axis; a no-op without one."""
    parallel = shard_lib.active()
    if parallel is None or parallel.context == 1:
        yield
        return
    c = parallel.context
    ways = c if parallel.context_attention == "all_to_all" else 2 * c
    swapped = [layer for layer in layers if _splittable(getattr(layer, "cache", None))]
    for layer in swapped:
        layer.cache = nnx.data(_Prefill(layer.cache, ways))
    try:
        yield
    finally:
        for layer in swapped:
            layer.cache = nnx.data(layer.cache.inner)
