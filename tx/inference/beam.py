"""Beam search over a contiguous or paged KV cache, inside one ``jax.jit``.

The prompt is prefilled once per row; the cache then forks every row into ``n`` beams (the
paged cache shares the prompt's full pages between a row's beams and copies only a partly
filled last page, the contiguous one repeats its rows). After each token the caches are
reordered by the surviving beams' parents (paged: only the pages a beam owns are copied).
Finished beams (a stop token emitted) only extend with PAD at no cost. The final ranking
divides each beam's log-probability by the GNMT length penalty
``((5 + length) / 6) ** length_penalty``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.attention import registry
from tx.inference.generation import (PAD, Contiguous, Generation, _check, _context,
                                     _last_logits, caches)

_NEG = -1e30  # a finite "impossible" score keeps arithmetic NaN-free


def beam_search(model: nnx.Module, prompt_bt, *, max_new_tokens: int, num_beams: int = 4,
                length_penalty: float = 1.0, stop_tokens: Sequence[int] = (), source_bs=None,
                source_lengths_b=None, cache=Contiguous()) -> Generation:
    """Best beam per row: ``tokens [B, max_new_tokens]``, ``lengths [B]`` and ``scores [B]``
    (the beam's total log-probability)."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be a positive integer.")
    _check(model, prompt_bt, max_new_tokens, cache, source_bs)
    if not cache.cached:
        raise ValueError(f"cache={cache!r}: beam search needs a cache to fork; use "
                         "Contiguous() or Paged(page_size).")
    prompt = jnp.asarray(prompt_bt, jnp.int32)
    cache.install(model, prompt, max_new_tokens, forks=num_beams)
    graphdef, state = nnx.split(model)
    model.drop_cache()
    source = None if source_bs is None else jnp.asarray(source_bs, jnp.int32)
    lengths = None if source_lengths_b is None else jnp.asarray(source_lengths_b, jnp.int32)
    tokens, gen_len, scores = registry.announced(_beam)(
        graphdef, state, prompt, source, lengths, num_beams=num_beams,
        max_new_tokens=max_new_tokens, length_penalty=float(length_penalty),
        stop_tokens=tuple(int(t) for t in stop_tokens))
    return Generation(np.asarray(tokens), np.asarray(gen_len), np.asarray(scores))


def _fork(model, context, n):
    """Every prefilled row becomes ``n`` beams: the caches fork, the encoder output repeats."""
    for c in caches(model):
        c.fork(n)
    if context is None:
        return None
    return jax.tree.map(lambda x: None if x is None else jnp.repeat(x, n, axis=0), context)


def _reorder(graphdef, state, rows):
    model = nnx.merge(graphdef, state, copy=True)
    for c in caches(model):
        c.reorder(rows)
    return nnx.state(model)


@functools.partial(jax.jit, static_argnames=("num_beams", "max_new_tokens", "length_penalty",
                                             "stop_tokens"))
def _beam(graphdef, state, prompt, source, lengths, *, num_beams, max_new_tokens,
          length_penalty, stop_tokens):
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    context = _context(model, source, lengths)
    b, n = prompt.shape[0], num_beams
    logits = jnp.repeat(_last_logits(model, prompt, context), n, axis=0)  # prefill once
    context = _fork(model, context, n)  # [B * n] rows from here on
    # Only beam 0 is alive at first, so the n beams start as n different tokens.
    scores = jnp.tile(jnp.array([0.0] + [_NEG] * (n - 1), jnp.float32), (b, 1))  # [B, n]
    out = jnp.full((b, n, max_new_tokens), PAD, jnp.int32)
    done = jnp.zeros((b, n), bool)
    gen_len = jnp.zeros((b, n), jnp.int32)
    graphdef, state = nnx.split(model)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def step(i, logits, state, scores, out, done, gen_len):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, n, -1)
        vocab = logp.shape[-1]
        # A finished beam continues only with PAD, at no cost.
        pad_only = jnp.full((vocab,), _NEG).at[PAD].set(0.0)
        logp = jnp.where(done[..., None], pad_only, logp)
        flat = (scores[..., None] + logp).reshape(b, n * vocab)
        scores, idx = jax.lax.top_k(flat, n)
        parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        out = jnp.take_along_axis(out, parent[..., None], axis=1)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[..., None], i, axis=2)
        was_done = jnp.take_along_axis(done, parent, axis=1)
        gen_len = jnp.take_along_axis(gen_len, parent, axis=1) + (~was_done).astype(jnp.int32)
        done = was_done | jnp.isin(token, stops)
        flat_rows = (parent + jnp.arange(b)[:, None] * n).reshape(-1)
        return _reorder(graphdef, state, flat_rows), scores, out, done, gen_len, token.reshape(-1)

    state, scores, out, done, gen_len, token = step(0, logits, state, scores, out, done, gen_len)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~done.all()

    def body(carry):
        i, state, scores, out, done, gen_len, token = carry
        model = nnx.merge(graphdef, state, copy=True)
        logits = _last_logits(model, token[:, None], context)
        state, scores, out, done, gen_len, token = step(i, logits, nnx.state(model), scores, out,
                                                        done, gen_len)
        return i + 1, state, scores, out, done, gen_len, token

    carry = (jnp.int32(1), state, scores, out, done, gen_len, token)
    _, _, scores, out, _, gen_len, _ = jax.lax.while_loop(cond, body, carry)
    penalty = ((5.0 + gen_len.astype(jnp.float32)) / 6.0) ** length_penalty
    best = jnp.argmax(scores / penalty, axis=1)  # [B]
    tokens = jnp.take_along_axis(out, best[:, None, None], axis=1)[:, 0]
    pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]  # noqa: E731
    return tokens, pick(gen_len), pick(scores)
