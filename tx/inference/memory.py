"""How many bytes a model's KV cache takes: the planner behind ``tx-kv-memory``.

Per decoding self-attention layer the cache holds keys and values,
``2 · kv_heads · head_dim · bytes · tokens`` per sequence, plus what quantisation adds:

* int8: one scale per token and K/V head, for K and V;
* int4 per token: two values per byte, a scale and a zero point per token and K/V head;
* int4 KIVI (paged only): keys per channel (a scale and a zero point per page, K/V head and
  channel), values per token, and each sequence's partial last page in the compute dtype.

A contiguous cache reserves ``tokens`` slots per sequence, except that a layer whose mask is
a causal window shorter than that rolls over ``window`` slots. A paged cache rounds each
sequence up to whole pages and keeps every position (pages are not rolled). A linear-attention
layer (FAVOR+) keeps a constant-size fp32 state, ``batch · kv_heads · features · (head_dim + 1)``.
An MLA layer (``tx.attention.mla``) stores one latent of ``kv_lora_rank + qk_rope_head_dim``
values per token for all heads together (one "head", no separate values), quantised as keys.

The figures are computed from the storage the caches allocate (``tx.attention.quant``), so
they are exact for the K/V arrays; block tables and counters are not counted.
"""

from __future__ import annotations

import jax.numpy as jnp

from tx.kernels import masks as masks_lib
from tx.attention import cache as cache_lib
from tx.attention import quant

__all__ = ["kv_cache_bytes", "kv_storage_of", "decoding_masks", "largest_batch"]

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def kv_storage_of(dtype, page_size: int | None) -> quant.KVQuant:
    """The ``KVQuant`` a planner dtype names: a float dtype, ``int8``, ``int4`` (KIVI with
    pages, per token without) or ``int4_per_token``; a ``KVQuant`` passes through."""
    if isinstance(dtype, quant.KVQuant):
        return dtype
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name in FLOAT_DTYPES:
        return quant.float_kv(jnp.dtype(name))
    if name in quant.KV_DTYPES:
        scheme = quant.KV_DTYPES[name]()
        # A residual scheme (KIVI) quantises whole pages: without pages, the same width per token.
        return quant.int4_per_token_kv() if scheme.residual and page_size is None else scheme
    raise ValueError(f"dtype={dtype!r}: use one of {FLOAT_DTYPES + tuple(quant.KV_DTYPES)} "
                     "or a tx.attention.quant.KVQuant.")


def attention_shapes(config, tokens: int) -> dict[str, int] | None:
    """``{"block 1: 8 queries x 16 keys": layers, ...}`` for a model that shortens its rows
    (Funnel's pooling), at rows of ``tokens``; None for one whose every layer sees them all."""
    body = getattr(config.head, "body", None)
    shapes = getattr(body, "attention_shapes", None)
    return None if shapes is None else shapes(tokens)


def decoding_masks(config) -> tuple:
    """One mask per decoding self-attention layer (a decoder's layers; an encoder-decoder's
    decoder layers: its encoder and cross-attention keep no cache)."""
    if not getattr(config.head, "generates", False):
        raise ValueError(f"head={config.head!r} does not decode, so it has no KV cache; plan "
                         "for a decoder (LMHead) or an encoder-decoder (Seq2SeqLM).")
    own = getattr(config.head, "decoder_layer_masks", None)
    if own is not None:
        return own(config, masks_lib.Causal())
    return config.attention.layer_masks(config.num_layers, masks_lib.Causal())


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def kv_cache_bytes(config, batch: int, tokens: int, *, dtype="float32",
                   page_size: int | None = None) -> int:
    """Bytes of K/V storage for ``batch`` sequences of ``tokens`` tokens each.

    Args:
      config: a ``tx.config.ModelConfig`` of a model that decodes.
      batch, tokens: sequences and tokens per sequence (prompt plus generated).
      dtype: ``float32``, ``bfloat16``, ``float16``, ``int8``, ``int4`` (KIVI when paged,
        per token otherwise), ``int4_per_token``, or a ``KVQuant``.
      page_size: tokens per page of a paged cache; None for the contiguous cache.
    """
    _positive("batch", batch)
    _positive("tokens", tokens)
    if page_size is not None:
        _positive("page_size", page_size)
    kv = kv_storage_of(dtype, page_size)
    k, h = config.kv_heads, config.head_dim
    width = getattr(config.positions, "cache_width", None)  # a scheme that widens K (XL)
    h = h if width is None else width(config)
    kv.check(h, page_size, "dtype")
    total = 0
    for i, mask in enumerate(decoding_masks(config)):
        state = getattr(mask, "state_bytes", None)
        if state is not None:  # a linear layer: a constant-size state, never paged
            if page_size is not None:
                raise ValueError(f"page_size={page_size}: layer {i} ({mask!r}) keeps a "
                                 "constant-size state, not K/V pages; plan without pages.")
            total += state(config, batch, tokens)
            continue
        latent = getattr(mask, "latent_width", None)  # MLA: keys only, values inside them
        heads, width, stores = (k, h, 2) if latent is None else (1, latent, 1)
        if latent is not None:
            kv.check(width, page_size, "dtype")
        if page_size is None:
            window = None if latent is not None else cache_lib.rolling_window(mask)
            slots = window if window is not None and window < tokens else tokens
            shape = (batch, slots, heads, width)
        else:
            shape = (heads, batch * -(-tokens // page_size), page_size, width)  # K-major pool
        total += quant.nbytes(kv.key, shape)
        if stores == 2:
            total += quant.nbytes(kv.value, shape)
        if kv.residual:  # each sequence's partial page(s) in the compute dtype
            total += stores * batch * page_size * heads * width * \
                jnp.dtype(config.dtype).itemsize
    return total


def largest_batch(config, tokens: int, memory_bytes: float, **kwargs) -> int:
    """The most sequences of ``tokens`` tokens whose cache fits ``memory_bytes`` (0: none).
    The cache grows with the batch exactly linearly, so one division suffices."""
    per_sequence = kv_cache_bytes(config, 1, tokens, **kwargs)
    return int(memory_bytes // per_sequence)
