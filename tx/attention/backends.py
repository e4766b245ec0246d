"""Attention backends: one value per implementation, with one optional method per path.

A :class:`Backend` has a ``name`` and any of the methods ``dense``, ``cached``, ``paged``,
``paged_write`` and ``linear``, each taking one typed call record (``tx.attention.calls``).
A method returns the output, or raises :class:`Decline` (any ``NotImplementedError``) saying
why it does not serve the call; the registry (``tx.attention.registry``) then tries the next
backend of the order and, when none serves, lists every backend with its reason. A backend
without a ``cached`` method serves a contiguous cache through ``dense`` at the cache's
positions; one without ``paged`` serves a paged cache through ``dense`` over gathered pages.

The built-in backends: ``xla`` (the ``jnp`` reference; every case), ``pallas`` (our Pallas
kernels: flash, paged decode, and a contiguous cache through the paged kernel over an
identity block table, linear), ``cpu`` (the fused C++ kernel) and ``cudnn``
(``jax.nn.dot_product_attention``). A research backend subclasses :class:`Backend` in its
own file and calls ``tx.attention.register(MyBackend())``; a plain function with the signature
of ``kernels.reference.attention`` registers as a dense-only backend
(:class:`FunctionBackend`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from tx.kernels import cpu_attention, reference, score_mods
from tx.kernels import masks as masks_lib
from tx.kernels.block_sizes import MAX_HEAD_DIM
from tx.kernels.flash_attention import registry_attention as _flash
from tx.kernels.linear_attention import linear_attention as _linear_kernel
from tx.kernels.linear_attention import linear_attention_chunked as _linear_chunked
from tx.kernels.paged_attention import paged_attention as _paged_kernel
from tx.kernels.delta_kernel import delta_rule_attention as _delta_kernel
from tx.kernels.delta_rule import delta_chunked as _delta_chunked
from tx.kernels.gated_chunked import gated_chunked as _gated_chunked
from tx.kernels.gated_linear import gated_linear_attention as _gated_kernel
from tx.attention import calls
from tx.parallel import blocks, per_shard
from tx.parallel import shard as shard_lib


class Decline(NotImplementedError):
    """A backend does not serve this call; the message says why (and the next one is tried)."""


class Backend:
    """One attention implementation. Subclasses set ``name`` and define the path methods they
    serve (``dense(call: calls.Dense)``, ``cached(call: calls.Cached)``, ``paged(call:
    calls.Paged)``, ``paged_write(call: calls.PagedWrite) -> (out, k_pages, v_pages)``,
    ``linear(call: calls.Linear)``); a method they lack is a path they do not serve."""

    name = ""

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in calls.PATHS if callable(getattr(self, p, None)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}: {', '.join(self.paths())})"


class FunctionBackend(Backend):
    """A function with the signature of ``kernels.reference.attention`` as a dense-only
    backend. It declines a call that sets an argument the function does not take (a score
    modifier for a function written before modifiers, say), rather than failing inside it."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: pass everything
            params = ()
        self._takes_any = not params or any(p.kind is p.VAR_KEYWORD for p in params)
        self._takes = {p.name for p in params}

    def dense(self, call: calls.Dense):
        kwargs = call.kwargs()
        if kwargs["score_mod"] is None:
            del kwargs["score_mod"]  # functions written before score modifiers still serve
        if not self._takes_any:
            unknown = [k for k, v in kwargs.items() if k not in self._takes and v is not None]
            if unknown:
                raise Decline(f"{getattr(self.fn, '__name__', self.fn)} takes no "
                              f"{', '.join(unknown)}")
            kwargs = {k: v for k, v in kwargs.items() if k in self._takes}
        return self.fn(call.q, call.k, call.v, **kwargs)


# -- xla: the reference, every case ---------------------------------------------------------------
def _linear_xla(call: calls.Linear):
    if call.causal:
        return _linear_chunked(call.q_f, call.k_f, call.v, chunk=call.chunk,
                               segment_ids=call.segment_ids, kv_lengths=call.kv_lengths)
    if call.segment_ids is None:
        return _bidirectional(call.q_f, call.k_f, call.v, call.kv_lengths)
    # Packed encoder batches: the quadratic form, masked by segment (O(T^2) memory).
    return reference.linear_attention(call.q_f, call.k_f, call.v, segment_ids=call.segment_ids,
                                      kv_lengths=call.kv_lengths, causal=False)


def _bidirectional(q_f, k_f, v, kv_lengths):
    """``phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)``: linear in the sequence length."""
    b, t, n, f = q_f.shape
    s, k = k_f.shape[1], k_f.shape[2]
    q_f, k_f = q_f.astype(jnp.float32), k_f.astype(jnp.float32)  # sums in fp32, as v's
    if kv_lengths is not None:
        keep = (jnp.arange(s)[None, :] < kv_lengths[:, None])[:, :, None, None]
        k_f = jnp.where(keep, k_f, 0.0)
    q = q_f.reshape(b, t, k, n // k, f)
    state = jnp.einsum("BSKF,BSKH->BKFH", k_f, v.astype(jnp.float32))
    num = jnp.einsum("BTKGF,BKFH->BTKGH", q, state)
    den = jnp.einsum("BTKGF,BKF->BTKG", q, k_f.sum(axis=1))
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, t, n, -1).astype(v.dtype)


def _no_tables(call, path: str) -> None:
    """Declines a modifier with row/column tables (DeBERTa's, ``kernels.row_tables``): they
    index a dense self-attention call's rows and columns, which a cache does not have."""
    if any(x is not None for x in score_mods.tables(call.score_mod)):
        raise Decline(f"{type(call.score_mod).__name__} holds row/column tables, which only "
                      f"dense self-attention takes, not the {path} path")


def _paged_kwargs(call: calls.Paged) -> dict:
    extra = {} if call.k_scales is None else {"k_scales": call.k_scales,
                                             "v_scales": call.v_scales}
    if call.score_mod is not None:
        extra["score_mod"] = call.score_mod
    if call.value_dim is not None:  # values read from the keys: no v_scales of their own
        extra.pop("v_scales", None)
        extra["value_dim"] = call.value_dim
    return dict(mask=call.mask, scale=call.scale, **extra)


def _same_head_dims(call: calls.Dense, why: str) -> None:
    """Declines values whose head dim differs from the keys' (MLA's expanded form)."""
    h, hv = call.k.shape[-1], call.v.shape[-1]
    if h != hv:
        raise Decline(f"values of head dim {hv} != the keys' {h}: {why}")


def _latent_per_shard(call) -> None:
    """Declines a latent cache (values = the keys' first columns) under a mesh: the per-shard
    wrappers split a v of its own."""
    if call.value_dim is not None and shard_lib.active() is not None:
        raise Decline("pages whose keys hold the values do not run per shard yet")


class Xla(Backend):
    """``kernels.reference``: plain ``jnp`` einsums that XLA partitions itself under a mesh.
    It serves every dense and linear call; a paged cache's pages it gathers K-major and
    attends without transposing them (a CPU decode step then costs what a contiguous one
    does)."""

    name = "xla"

    def dense(self, call: calls.Dense):
        return reference.attention(call.q, call.k, call.v, **call.kwargs())

    def cached(self, call: calls.Cached):
        if call.value_dim is None:
            # The dense fallback at the cache's positions is this same computation.
            raise Decline("a contiguous cache is served through dense at its positions")
        _no_tables(call, "cached")
        return reference.cached_attention(call.q, call.k, None, call.lengths, mask=call.mask,
                                          scale=call.scale, score_mod=call.score_mod,
                                          value_dim=call.value_dim)

    def block(self, call: calls.Block):
        return blocks.reference(call)

    def paged(self, call: calls.Paged):
        _no_tables(call, "paged")
        return reference.paged_attention(call.q, call.k_pages, call.v_pages,
                                         call.block_tables, call.lengths, **_paged_kwargs(call))

    def linear(self, call: calls.Linear):
        return _linear_xla(call)

    def gated(self, call: calls.Gated):
        data = dict(chunk=call.chunk, segment_ids=call.segment_ids, kv_lengths=call.kv_lengths)
        if call.beta is not None:
            return _delta_chunked(call.q, call.k, call.v, call.log_decay, call.beta, **data)
        return _gated_chunked(call.q, call.k, call.v, call.log_decay, **data)


# -- pallas: our kernels ----------------------------------------------------------------------------
_MAX_PAGED_TOKENS = 16  # tokens per paged-kernel call; longer prefills go in chunks of this many
_MAX_PAGED_CHUNKS = 64  # past this many chunks a prefill attends over the gathered pages
_CACHE_PAGE = 16  # a contiguous cache is read as pages of this many tokens


class Pallas(Backend):
    """Our Pallas kernels (``kernels/``): flash attention (forward and backward, tile
    skipping, native GQA), the paged decode kernel (in place, int8 pages), a contiguous
    cache read through the paged kernel over an identity block table, and the chunkwise
    causal linear kernel. Per shard under a mesh (``tx.parallel.per_shard``)."""

    name = "pallas"

    def __init__(self):
        self._flash = per_shard.attention(_flash)

    def dense(self, call: calls.Dense):
        return self._flash(call.q, call.k, call.v, **call.kwargs())

    def cached(self, call: calls.Cached):
        _no_tables(call, "cached")
        b, s, kh, h = call.k.shape
        pages = -(-s // _CACHE_PAGE)
        pad = pages * _CACHE_PAGE - s
        if pad and (call.mask or masks_lib.Full()).band() is None:
            # Padded pages change the key length a non-banded mask may read (BigBird).
            raise Decline(f"a cache of {s} slots is no multiple of {_CACHE_PAGE} and {call.mask} "
                          "is not banded")

        def as_pages(x):  # [B, S, K, H] -> [K, B * pages, L, H], page j of row b at b*pages + j
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
            return jnp.moveaxis(x.reshape(b, pages, _CACHE_PAGE, kh, h), 3, 0).reshape(
                kh, b * pages, _CACHE_PAGE, h)

        tables = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
        v_pages = None if call.value_dim is not None else as_pages(call.v)
        return self.paged(calls.Paged(call.q, as_pages(call.k), v_pages, tables,
                                      call.lengths, mask=call.mask, scale=call.scale,
                                      score_mod=call.score_mod, value_dim=call.value_dim))

    def paged(self, call: calls.Paged):
        """Decode steps of up to ``_MAX_PAGED_TOKENS`` tokens; a longer prefill under a mask
        that never shows a query later keys (causal, sliding window) runs as chunks: chunk
        ``c`` is exact with the length cut at its last token, since later keys are hidden
        from it anyway."""
        _no_tables(call, "paged")
        q, page = call.q, call.k_pages.shape[2]
        if call.k_pages.shape[-1] > MAX_HEAD_DIM:  # MLA's latent of DeepSeek-V3 is 576 wide
            raise Decline(f"head dim {call.k_pages.shape[-1]} > {MAX_HEAD_DIM}, the widest "
                          "tile the paged kernel holds")
        _latent_per_shard(call)
        t = 1 if q.ndim == 3 else q.shape[1]
        band = (call.mask or masks_lib.Full()).band()
        if t > _MAX_PAGED_TOKENS and (band is None or band[1] > 0 or
                                      t > _MAX_PAGED_TOKENS * _MAX_PAGED_CHUNKS):
            raise Decline(f"{t} new tokens under {call.mask}: the paged kernel serves decode "
                          f"steps of up to {_MAX_PAGED_TOKENS}, and causal prefills of up to "
                          f"{_MAX_PAGED_TOKENS * _MAX_PAGED_CHUNKS}")
        if page & (page - 1):
            raise Decline(f"page size {page} is not a power of two")
        kernel, kwargs = per_shard.paged(_paged_kernel), _paged_kwargs(call)
        args = (call.k_pages, call.v_pages, call.block_tables)
        if t <= _MAX_PAGED_TOKENS:
            return kernel(q, *args, call.lengths, **kwargs)
        outs = []
        for c0 in range(0, t, _MAX_PAGED_TOKENS):
            c1 = min(t, c0 + _MAX_PAGED_TOKENS)
            outs.append(kernel(q[:, c0:c1], *args, call.lengths - (t - c1), **kwargs))
        return jnp.concatenate(outs, axis=1)

    def block(self, call: calls.Block):
        return blocks.flash(call)

    def linear(self, call: calls.Linear):
        if not call.causal:
            raise Decline("the kernel computes the causal form; the bidirectional one is two "
                          "einsums")
        return _linear_kernel(call.q_f, call.k_f, call.v, chunk=call.chunk,
                              segment_ids=call.segment_ids, kv_lengths=call.kv_lengths)

    def gated(self, call: calls.Gated):
        if call.beta is not None:  # forward kernel; gradients through the chunked jnp form
            return _delta_kernel(call.q, call.k, call.v, call.log_decay, call.beta,
                                 chunk=call.chunk, segment_ids=call.segment_ids,
                                 kv_lengths=call.kv_lengths)
        return _gated_kernel(call.q, call.k, call.v, call.log_decay, chunk=call.chunk,
                             segment_ids=call.segment_ids, kv_lengths=call.kv_lengths)


# -- cpu: the fused C++ kernel -----------------------------------------------------------------------
def _whole_pool(fn: Callable) -> Callable:
    """A writer stores into the whole page pool: per shard, each device's copy of a pool
    shared across batch shards would take only its own rows' tokens, so under a mesh it
    declines (the paged kernels run per shard instead)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if shard_lib.active() is not None:
            raise Decline("a paged writer does not run per shard")
        return fn(*args, **kwargs)
    return call


class Cpu(Backend):
    """``kernels/cpu_attention.cc`` through XLA's FFI: fp32 compute on the CPU backend, banded
    and small dense masks, forward and backward (values of their own head dim too);
    contiguous and paged caches read in place (latent ones, whose values are the keys' first
    columns, too: MLA), and a paged step stored and attended in one call."""

    name = "cpu"

    def __init__(self):
        self._dense = per_shard.attention(cpu_attention.attention)
        self._cached = per_shard.cached(cpu_attention.cached_attention)
        self._paged = per_shard.paged(cpu_attention.paged_attention)
        self._write = _whole_pool(cpu_attention.paged_write_attention)

    def dense(self, call: calls.Dense):
        return self._dense(call.q, call.k, call.v, **call.kwargs())

    def cached(self, call: calls.Cached):
        _latent_per_shard(call)
        extra = {} if call.value_dim is None else {"value_dim": call.value_dim}
        return self._cached(call.q, call.k, call.v, call.lengths, mask=call.mask,
                            scale=call.scale, score_mod=call.score_mod, **extra)

    def paged(self, call: calls.Paged):
        _latent_per_shard(call)
        return self._paged(call.q, call.k_pages, call.v_pages, call.block_tables, call.lengths,
                           **_paged_kwargs(call))

    def paged_write(self, call: calls.PagedWrite):
        return self._write(call.q, call.k_new, call.v_new, call.k_pages, call.v_pages,
                           call.block_tables, call.lengths, mask=call.mask, scale=call.scale,
                           score_mod=call.score_mod)


# -- cudnn: jax.nn.dot_product_attention ------------------------------------------------------------
class Cudnn(Backend):
    """``jax.nn.dot_product_attention(implementation="cudnn")``, for the dense cases it
    expresses exactly: fp16/bf16 on a GPU, full / square-causal / causal-window masks, no
    segment ids, positions or score modifiers."""

    name = "cudnn"

    def dense(self, call: calls.Dense):
        q, k = call.q, call.k
        if jax.default_backend() != "gpu":
            raise Decline("cuDNN needs a GPU")
        if call.score_mod is not None:
            raise Decline("score modifiers are not expressed through jax.nn")
        _same_head_dims(call, "jax.nn.dot_product_attention takes one head dim")
        if q.dtype.itemsize != 2:
            raise Decline(f"cuDNN flash attention takes fp16/bf16, not {q.dtype}")
        if call.segment_ids is not None or call.q_positions is not None or \
                call.kv_positions is not None:
            raise Decline("segment ids and custom positions are not expressed")
        mask = masks_lib.Full() if call.mask is None else call.mask
        t, s = q.shape[1], k.shape[1]
        band = mask.band()
        if band is None or (band[1] == 0 and t != s) or band[1] not in (0, float("inf")):
            # jax.nn's causal flag is top-left aligned; only square causal cases agree.
            raise Decline(f"mask {mask} has no cuDNN equivalent")
        window = None if band[0] == float("-inf") else (int(-band[0]), 0)
        return jax.nn.dot_product_attention(
            q, k, call.v, bias=call.bias, scale=call.scale, is_causal=band[1] == 0,
            local_window_size=window, key_value_seq_lengths=call.kv_lengths,
            implementation="cudnn")
