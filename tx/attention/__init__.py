"""Attention: the layer, the implementation registry, KV caches and the mask algebra.

The attention variant is three independent choices: heads (``num_kv_heads``), pattern (a
mask from ``kernels.masks``, re-exported here) and implementation (registry names).
A schedule may also hold layer values that build their own attention: ``Favor`` (FAVOR+
linear attention) and ``LocalGlobal`` (local softmax plus a gated FAVOR+ path). KV caches may
be quantised (``int8_kv()``, ``int4_per_token_kv()``, ``kivi_kv()``; ``tx.attention.quant``).
"""

from tx.kernels.masks import (EMPTY, FULL, PARTIAL, And, BigBird, Causal, Full, GlobalTokens,
                           Local, Mask, Or, Strided)
from tx.attention.cache import KVCache, RollingKVCache, make_cache
from tx.attention.favor import Favor, LocalGlobal
from tx.attention.layer import Attention
from tx.attention.mla import MLA, MLAttention
from tx.attention.quant import int4_per_token_kv, int8_kv, kivi_kv
from tx.attention import calls
from tx.attention.backends import Backend, Decline
from tx.attention.registry import attend, defaults, explain, names, register

__all__ = ["Attention", "MLA", "MLAttention", "KVCache", "RollingKVCache", "make_cache", "attend", "register",
           "Favor", "LocalGlobal", "int8_kv", "int4_per_token_kv", "kivi_kv",
           "names", "defaults", "explain", "Backend", "Decline", "calls", "Mask", "Full", "Causal", "Local", "Strided", "BigBird", "GlobalTokens",
           "And", "Or", "EMPTY", "PARTIAL", "FULL"]
