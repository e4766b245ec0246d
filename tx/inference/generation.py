"""Generation for decoder-only and encoder-decoder tx models: prefill, then decode.

The whole decode loop runs inside one ``jax.jit`` (a ``lax.while_loop`` over tokens that
stops once every row has emitted a stop token), so nothing recompiles per token. Cache kinds:

* ``"contiguous"``: the model's own KV caches (``init_cache``; rolling for causal windows);
* ``"paged"``: K/V in fixed-size pages of a shared pool (``tx.attention.paged``), allocated
  by the host-side ``PagePool``; rows with the same prompt share their full prompt pages;
* ``"none"``: full recompute of the whole buffer every token (the reference the caches must
  match; causal masks keep the not-yet-written tail from mattering).

``Contiguous(kv=...)`` and ``Paged(..., kv=...)`` quantise the cache (``tx.attention.quant``:
int8, per-token int4, and KIVI int4 on pages); ``tx.inference.kv_cache_bytes`` plans its size.

Prompts in a batch share one length (left-align ragged prompts into separate calls).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.attention.paged import ForkPlan, PagedKVCache
from tx.attention import registry
from tx.attention.quant import KV_DTYPES, KVQuant
from tx.inference.paged_cache import PagePool
from tx.inference.sampling import Greedy
from tx.parallel.prefill import prefill as context_prefill
from tx.registry import Registry
from tx.layers.block import Block
from tx.models import Seq2Seq, Tower

PAD = 0


def _check_kv(kv) -> None:
    if kv is not None and not isinstance(kv, KVQuant):
        raise ValueError(f"cache.kv={kv!r}: give a tx.attention.quant.KVQuant (int8_kv(), "
                         "kivi_kv(), ...) or None to store the compute dtype.")


@dataclasses.dataclass(frozen=True)
class Contiguous:
    """Every decoding self-attention gets its own preallocated (or rolling) KV cache, stored
    in the compute dtype or quantised by ``kv`` (token-wise schemes: int8, per-token int4)."""

    kv: KVQuant | None = None
    cached = True  # decoding reads and extends it; beam search forks it

    def __post_init__(self):
        _check_kv(self.kv)

    def install(self, model, prompt_bt, max_new_tokens: int, *, forks: int = 1) -> None:
        model.init_cache(prompt_bt.shape[0], prompt_bt.shape[1] + max_new_tokens, kv=self.kv)


@dataclasses.dataclass(frozen=True)
class Paged:
    """K/V in pages of ``page_size`` tokens from a shared pool (``num_pages``: None sizes it to
    the request), stored in the compute dtype or quantised by ``kv`` (int8, per-token int4, or
    KIVI int4 with the partial page in full precision)."""

    page_size: int = 16
    num_pages: int | None = None
    kv: KVQuant | None = None
    cached = True

    def __post_init__(self):
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or \
                self.page_size < 1:
            raise ValueError(f"cache.page_size={self.page_size!r}: a positive integer, e.g. 16.")
        _check_kv(self.kv)

    def install(self, model, prompt_bt, max_new_tokens: int, *, forks: int = 1) -> None:
        init_paged_cache(model, prompt_bt, max_new_tokens, page_size=self.page_size,
                         num_pages=self.num_pages, forks=forks, kv=self.kv)


@dataclasses.dataclass(frozen=True)
class Recompute:
    """No cache: every token reruns the model over the whole buffer."""

    cached = False

    def install(self, model, prompt_bt, max_new_tokens: int, *, forks: int = 1) -> None:
        pass  # nothing to allocate


@dataclasses.dataclass
class Generation:
    """``tokens [B, max_new_tokens]`` (PAD after a stop token) and ``lengths [B]`` (tokens
    generated, the stop token included)."""

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray | None = None  # beam search: the best beam's total log-probability


def _check(model, prompt_bt, max_new_tokens, cache, source_bs):
    if getattr(prompt_bt, "ndim", None) != 2 or prompt_bt.shape[1] < 1:
        raise ValueError(f"prompt_bt.shape={getattr(prompt_bt, 'shape', None)} must be "
                         "[B, T] with T >= 1 (start with BOS for an empty prompt).")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    if not callable(getattr(cache, "install", None)):
        raise ValueError(f"cache={cache!r}: give a cache value, Contiguous(), Paged(page_size) "
                         "or Recompute().")
    cfg = model.config
    if not getattr(cfg.head, "generates", False):
        raise ValueError(f"head={cfg.head!r} does not generate; use a decoder (LMHead) or an "
                         "encoder-decoder (Seq2SeqLM) model.")
    seq2seq = isinstance(model, Seq2Seq)
    if seq2seq != (source_bs is not None):
        raise ValueError("source_bs is required for an encoder-decoder model and must be None "
                         f"for a decoder-only one (this one is {type(model).__name__}).")
    total = prompt_bt.shape[1] + max_new_tokens
    max_len = getattr(cfg.positions, "max_len", None)
    if max_len is not None and total > max_len:
        raise ValueError(f"prompt length {prompt_bt.shape[1]} + max_new_tokens="
                         f"{max_new_tokens} exceeds the positions' max_len={max_len}.")
    check_token_ids("prompt_bt", prompt_bt, cfg.vocab_size)
    if source_bs is not None:
        check_token_ids("source_bs", source_bs, cfg.vocab_size)
    return total


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """Host-side: every entry of ``ids [B, T]`` is an integer token id in ``[0, vocab_size)``.

    Inside the jitted decode loop an embedding lookup clamps a bad id and casting a float
    truncates it, so either would silently give some other token's continuation.
    """
    arr = np.asarray(ids)
    fix = f"token ids must be integers in [0, vocab_size={vocab_size})"
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}.dtype={arr.dtype} is not a token-id dtype: {fix}; pass an "
                         "int32 array.")
    if arr.ndim != 2:
        raise ValueError(f"{name}.shape={arr.shape} must be [B, T] token ids.")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        not_int = ~finite | (np.where(finite, arr, 0) != np.round(np.where(finite, arr, 0)))
        if not_int.any():
            i, j = (int(x) for x in np.argwhere(not_int)[0])
            raise ValueError(f"{name}[{i}, {j}]={arr[i, j].item()!r} (batch row {i}, column "
                             f"{j}) is not an integer token id: {fix}; pass an int32 array.")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        value = arr[i, j].item()
        raise ValueError(f"{name}[{i}, {j}]={value!r} (batch row {i}, column {j}) is outside "
                         f"the vocabulary: {fix}; map it into the model's vocabulary or use a "
                         "model whose vocab_size covers it.")


def _last_logits(model, tokens_bt, context):
    """fp32 logits ``[B, V]`` of the last position of ``tokens_bt``."""
    if context is None:
        return model(tokens_bt)[:, -1]
    return model.decode(tokens_bt, context["encoded"],
                        source_lengths_b=context["source_lengths"])[:, -1]


def _finish(done, new, stop_tokens):
    """Marks rows that just emitted a stop token; rows already done emit PAD."""
    new = jnp.where(done, PAD, new)
    stopped = jnp.isin(new, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else \
        jnp.zeros_like(done)
    return new, done | stopped


def decoding_attentions(model) -> list[nnx.Module]:
    """The self-attention layers that decode, in layer order: those of the blocks in every
    tower, except a seq2seq model's encoder. One walk of the graph: every generate with the
    paged cache makes it, and a walk costs milliseconds of a short decode."""
    skip = model.encoder.tower if isinstance(model, Seq2Seq) else None
    nodes = list(nnx.iter_graph(model))
    towers = [path for path, node in nodes if isinstance(node, Tower) and node is not skip]
    return [node.self_attn for path, node in nodes if isinstance(node, Block)
            and any(path[:len(t)] == t for t in towers)]


def caches(model) -> list[nnx.Module]:
    """The decoding self-attentions' caches, in layer order."""
    return [attn.cache for attn in decoding_attentions(model)]


def init_paged_cache(model, prompt_bt, max_new_tokens: int, *, page_size: int = 16,
                     num_pages: int | None = None, forks: int = 1,
                     kv: KVQuant | None = None) -> PagePool:
    """Gives every decoding self-attention a ``PagedKVCache`` whose pages come from a
    ``PagePool`` (prefix sharing on); returns the pool for inspection.

    With ``forks > 1`` the cache starts with one row per prompt (prefilled once) and carries
    the pool's plan for ``fork(forks)``: every fork shares the prompt's full pages, gets its
    own copy of a partly filled last prompt page (copy-on-write) and its own pages for the
    ``max_new_tokens`` it will generate.
    """
    attentions = decoding_attentions(model)  # walked once: the walk costs a decode's milliseconds
    for i, attn in enumerate(attentions):
        if not attn.pageable:
            raise ValueError(f"cache=Paged(page_size={page_size}): layer {i} is "
                             f"{type(attn).__name__}, which keeps a constant-size state, not "
                             "K/V pages; use cache=Contiguous() for models with linear layers.")
    prompt = np.asarray(prompt_bt)
    b, t = prompt.shape
    width = -(-(t + max_new_tokens) // page_size)
    shared = t // page_size if forks > 1 else 0  # full prompt pages, stored once per prompt
    pool = PagePool(num_pages or b * (shared + forks * (width - shared)), page_size)
    seq_ids = [pool.add_sequence([int(x) for x in row]).seq_id for row in prompt]
    plan = None
    if forks > 1:
        tables = pool.block_table(seq_ids, width=width)  # the prefill writes the prompt pages
        plan = _plan_forks(pool, seq_ids, forks, max_new_tokens, width, shared)
    else:
        for seq_id in seq_ids:
            pool.append(seq_id, max_new_tokens)  # reserve: decoding never allocates
        tables = pool.block_table(seq_ids, width=width)
    tables = jnp.asarray(tables, jnp.int32)  # one host-to-device copy, shared by every layer
    for attn in attentions:
        # A layer that lays out its own pages (MLA: one latent pool, no V) builds them.
        own = getattr(attn, "paged_cache", None)
        if own is not None:
            attn.cache = nnx.data(own(tables, pool.num_pages, page_size, fork_plan=plan, kv=kv))
            continue
        _, k, h = attn.k_dkh[...].shape
        attn.cache = nnx.data(PagedKVCache(tables, pool.num_pages, page_size, k, h,
                                           dtype=attn.dtype, fork_plan=plan, kv=kv))
    return pool


def _plan_forks(pool: PagePool, seq_ids, forks: int, max_new_tokens: int, width: int,
                shared: int) -> ForkPlan:
    rows = []
    for seq_id in seq_ids:
        rows += [seq_id] + [pool.fork(seq_id) for _ in range(forks - 1)]
    copies = []
    for row in rows:  # reserve every fork's pages; a shared partial page is copied first
        copies += pool.append(row, max_new_tokens).copies
    # Every row holds exactly `width` pages, so reorder never touches a padding entry.
    assert all(len(pool.pages(row)) == width for row in rows)
    return ForkPlan(pool.block_table(rows, width=width), np.asarray(copies, np.int32),
                    private_from=shared)


def generate(model: nnx.Module, prompt_bt, *, max_new_tokens: int, strategy=Greedy(),
             stop_tokens: Sequence[int] = (), cache=Contiguous(), seed: int = 0,
             source_bs=None, source_lengths_b=None) -> Generation:
    """Continues ``prompt_bt [B, T]`` by up to ``max_new_tokens`` tokens.

    For an encoder-decoder model, ``prompt_bt`` is the decoder's start (e.g. ``[[BOS]]``)
    and ``source_bs`` the encoder input.
    """
    _check(model, prompt_bt, max_new_tokens, cache, source_bs)
    prompt = jnp.asarray(prompt_bt, jnp.int32)
    cache.install(model, prompt, max_new_tokens)
    graphdef, state = nnx.split(model)
    model.drop_cache()
    # Says once which backend serves each attention path (when the step is traced).
    run = registry.announced(_decode_cached if cache.cached else _decode_recompute)
    source = None if source_bs is None else jnp.asarray(source_bs, jnp.int32)
    lengths = None if source_lengths_b is None else jnp.asarray(source_lengths_b, jnp.int32)
    tokens, done_at = run(graphdef, state, prompt, source, lengths, jax.random.key(seed),
                          max_new_tokens=max_new_tokens, strategy=strategy,
                          stop_tokens=tuple(int(t) for t in stop_tokens))
    return Generation(np.asarray(tokens), np.asarray(done_at))


def _context(model, source, lengths):
    if source is None:
        return None
    model.eval()
    return {"encoded": model.encode(source, source_lengths_b=lengths), "source_lengths": lengths}


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "strategy", "stop_tokens"))
def _decode_cached(graphdef, state, prompt, source, lengths, key, *, max_new_tokens, strategy,
                   stop_tokens):
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    context = _context(model, source, lengths)
    b = prompt.shape[0]
    key, sub = jax.random.split(key)
    with context_prefill(decoding_attentions(model)):  # the prompt split over mesh.context
        first = strategy(_last_logits(model, prompt, context), sub)  # prefill
    first, done = _finish(jnp.zeros((b,), bool), first, stop_tokens)
    out = jnp.full((b, max_new_tokens), PAD, jnp.int32).at[:, 0].set(first)
    gen_len = jnp.ones((b,), jnp.int32)
    graphdef, state = nnx.split(model)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~done.all()

    def body(carry):
        i, state, out, gen_len, done, key = carry
        model = nnx.merge(graphdef, state, copy=True)
        key, sub = jax.random.split(key)
        last_bt = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        new = strategy(_last_logits(model, last_bt, context), sub)
        new, now_done = _finish(done, new, stop_tokens)
        gen_len = gen_len + (~done).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
        return i + 1, nnx.state(model), out, gen_len, now_done, key

    carry = (jnp.int32(1), state, out, gen_len, done, key)
    _, _, out, gen_len, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, gen_len


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "strategy", "stop_tokens"))
def _decode_recompute(graphdef, state, prompt, source, lengths, key, *, max_new_tokens,
                      strategy, stop_tokens):
    """No cache: every token reruns the model over the whole fixed-size buffer."""
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    context = _context(model, source, lengths)
    b, t = prompt.shape
    buffer = jnp.concatenate([prompt, jnp.full((b, max_new_tokens), PAD, jnp.int32)], axis=1)

    def logits_at(buffer, pos):
        if context is None:
            logits = model(buffer)
        else:
            logits = model.decode(buffer, context["encoded"],
                                  source_lengths_b=context["source_lengths"])
        return jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False)

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < max_new_tokens) & ~done.all()

    def body(carry):
        i, buffer, done, gen_len, key = carry
        key, sub = jax.random.split(key)
        new = strategy(logits_at(buffer, t + i - 1), sub)
        new, now_done = _finish(done, new, stop_tokens)
        gen_len = gen_len + (~done).astype(jnp.int32)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, new[:, None], t + i, axis=1)
        return i + 1, buffer, now_done, gen_len, key

    carry = (jnp.int32(0), buffer, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), key)
    _, buffer, _, gen_len, _ = jax.lax.while_loop(cond, body, carry)
    return buffer[:, t:], gen_len


# ``--cache`` names (tx.flags.cache); a research file adds its own cache value with
# CACHES.register(name, cls), ``cls(kv=..., **options)`` building it.
CACHES = Registry("cache", "cache", register_hint="tx.inference.generation.CACHES.register")
CACHES.register("contiguous", Contiguous)
CACHES.register("paged", Paged)
CACHES.register("none", Recompute)


def kv_storage(name: str):
    """The ``KVQuant`` of a ``--kv_dtype`` / ``inference.kv_dtype`` name (``auto``: None,
    the compute dtype; ``int8``; ``int4``: KIVI; ``int4_per_token``; or a registered one)."""
    if name == "auto":
        return None
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype={name!r}: use one of {('auto', *KV_DTYPES.names())}.")
    return KV_DTYPES[name]()


def cache(name: str, *, kv_dtype: str = "auto", **options):
    """The cache value of a ``--cache`` flag (``contiguous``, ``paged``, ``none``), storing
    K/V as ``kv_dtype`` names (``kv_storage``)."""
    cls = CACHES[name]  # an unknown name fails here, naming the choices
    kv = kv_storage(kv_dtype)
    if kv is None:
        return cls(**options)
    if not getattr(cls, "cached", True):
        raise ValueError(f"kv_dtype={kv_dtype!r}: needs a cache to quantise; use "
                         "--cache=contiguous or --cache=paged, or kv_dtype=auto (not with "
                         f"--cache={name}).")
    if kv.residual and name != "paged":
        raise ValueError(f"kv_dtype={kv_dtype!r}: (KIVI) quantises keys per channel over full "
                         "pages, so it needs --cache=paged; or use kv_dtype=int8 / "
                         "int4_per_token.")
    return cls(kv=kv, **options)
