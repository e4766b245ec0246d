"""Attention: the layer, the implementation registry, KV caches and the mask algebra.

The attention variant is three independent choices: heads (``num_kv_heads``), pattern (a
mask from ``kernels.masks``, re-exported here) and implementation (registry names).
"""

from kernels.masks import (EMPTY, FULL, PARTIAL, And, BigBird, Causal, Full, GlobalTokens,
                           Local, Mask, Or, Strided)
from tx.attention.cache import KVCache, RollingKVCache, make_cache
from tx.attention.layer import Attention
from tx.attention.registry import attend, names, register

__all__ = ["Attention", "KVCache", "RollingKVCache", "make_cache", "attend", "register",
           "names", "Mask", "Full", "Causal", "Local", "Strided", "BigBird", "GlobalTokens",
           "And", "Or", "EMPTY", "PARTIAL", "FULL"]
