"""The attention layer: projections, heads (MHA/GQA/MQA), a mask, an implementation.

The three axes stay independent: ``num_kv_heads`` sets how K/V heads are shared, ``mask`` sets
which keys a query sees, ``implementation`` names registry entries (or callables) tried in
order. Position information enters through one module shared by a tower's layers
(``tx.layers.positions.Positions``): it ``rotate``s q and k (RoPE) and may ``bias`` the logits
(T5 relative buckets, ALiBi). ``scale`` multiplies the logits (default ``head_dim ** -0.5``;
T5 folds it into its initialisation and uses 1.0).

Every call goes through a cache with one protocol, ``attend`` (``tx.attention.cache``): no cache
(training, encoders), contiguous, rolling or paged (decoding).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tx.kernels import masks as masks_lib
from tx.kernels import score_mods
from tx import parallel
from tx.attention import cache as cache_lib
from tx.attention import registry
from tx.config import DEFAULT_IMPLEMENTATION
from tx.layers.positions import Positions


def _projection(rngs, shape, names, in_axis, out_axis, param_dtype):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=in_axis, out_axis=out_axis)
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, param_dtype))


def rows_dot(x: jax.Array, w: jax.Array, axes: int) -> jax.Array:
    """Contracts ``x``'s last ``axes`` axes with ``w``'s first ones as one 2-D dot of rows,
    ``[M, prod(in)] @ [prod(in), prod(out)]``. As an einsum over ``N, H`` XLA's CPU backend
    chose an ``H, N`` order and transposed ``o_nhd`` inside every decode step (LLaMA batch-1
    generate 66.8 -> 57.3 ms without it); the reshapes are free."""
    lead, k = x.shape[:x.ndim - axes], math.prod(w.shape[:axes])
    return (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(*lead, *w.shape[axes:])


class Attention(nnx.Module):
    """``[B, T, D] -> [B, T, D]`` self-attention, or cross-attention when given a context.

    GQA is native: q is ``[B, T, N, H]``, k/v ``[B, S, K, H]`` and the implementation groups
    the ``N / K`` query heads of each K/V head (no repeated K/V in memory).
    """

    pageable = True  # decoding can keep its K/V in a paged cache

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 mask: masks_lib.Mask | None = None, implementation: Sequence = DEFAULT_IMPLEMENTATION,
                 positions: Positions | None = None, use_bias: bool = False,
                 out_bias: bool | None = None, scale: float | None = None,
                 score_mod: score_mods.ScoreMod | None = None, sinks: bool = False,
                 qk_norm=None, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be divisible by "
                             f"num_kv_heads={num_kv_heads}.")
        registry.check(implementation)
        n, k, h, d = num_heads, num_kv_heads, head_dim, d_model
        self.q_dnh = _projection(rngs, (d, n, h), ("embed", "heads", "head_dim"), 0, (1, 2),
                                 param_dtype)
        self.k_dkh = _projection(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 0, (1, 2),
                                 param_dtype)
        self.v_dkh = _projection(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), 0, (1, 2),
                                 param_dtype)
        self.o_nhd = _projection(rngs, (n, h, d), ("heads", "head_dim", "embed"), (0, 1), 2,
                                 param_dtype)
        # Optional projection biases (GPT-2, BERT); None when absent, so no state entry.
        def bias_param(shape, names, present=use_bias):
            if not present:
                return None
            init = nnx.with_partitioning(nnx.initializers.zeros_init(), names,
                                         eager_sharding=False)
            return nnx.Param(init(rngs.params(), shape, param_dtype))
        self.q_bias_nh = bias_param((n, h), ("heads", "head_dim"))
        self.k_bias_kh = bias_param((k, h), ("kv_heads", "head_dim"))
        self.v_bias_kh = bias_param((k, h), ("kv_heads", "head_dim"))
        self.o_bias_d = bias_param((d,), ("embed",),
                                   use_bias if out_bias is None else out_bias)
        # Per-head q/k norms over H (Qwen3, Gemma 3): ``qk_norm`` is a norm value
        # (``tx.layers.RMSNorm``...) built twice at width H; None: no state entries.
        self.q_norm = None if qk_norm is None else qk_norm.build(h, dtype=dtype, rngs=rngs)
        self.k_norm = None if qk_norm is None else qk_norm.build(h, dtype=dtype, rngs=rngs)
        self.mask = masks_lib.Full() if mask is None else mask
        self.implementation = tuple(implementation)
        self.positions = Positions() if positions is None else positions
        # Learned score modifiers: the parameters the modifiers declare (the positions', the
        # configured one, the sinks': ``sink_n``, zeros, so a sink first takes the mass of one
        # key of logit 0) are this layer's, by their declared names; bound in ``logits_mod``.
        self.score_mod = score_mods.chain(score_mod, score_mods.Sinks() if sinks else None)
        mods = score_mods.chain(self.positions.score_mod(), self.score_mod)
        declared = {} if mods is None else mods.learned(n)
        for name, spec in declared.items():
            if not name.isidentifier() or hasattr(self, name):
                raise ValueError(f"score_mod={mods!r} declares a learned parameter {name!r}, "
                                 "which is no free attribute name of the attention layer; "
                                 "rename it.")
            init = nnx.with_partitioning(spec.init, spec.axes, eager_sharding=False)
            setattr(self, name, nnx.Param(init(rngs.params(), spec.shape, param_dtype)))
        self.learned_names = tuple(declared)
        score_mods.check(self.logits_mod(), n)  # shapes, once bound, before any tracing
        self.scale = scale
        self.dtype = dtype
        self.cache: nnx.Module | None = nnx.data(None)  # set by init_cache for incremental decoding

    @property
    def num_kv_heads(self) -> int:
        return self.k_dkh[...].shape[1]

    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        """Switches this layer to incremental decoding (a rolling cache for causal windows);
        ``kv`` (``tx.attention.quant.KVQuant``) quantises the cache."""
        _, k, h = self.k_dkh[...].shape
        self.cache = nnx.data(cache_lib.make_cache(self.mask, batch, max_len, k, h,
                                                   dtype=dtype or self.dtype, kv=kv))

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None, *,
                 context_bsd: jax.Array | None = None, segment_ids=None,
                 kv_lengths: jax.Array | None = None) -> jax.Array:
        """Args:
          x_btd: queries' input (and keys'/values' for self-attention).
          positions_bt: int32 positions for ``rope``/``bias`` (default ``arange``, offset by
            the cache for decoding); restart them per document when packing.
          context_bsd: the encoder output for cross-attention.
          segment_ids: ``(q_ids [B,T], kv_ids [B,S])``; equal ids attend.
          kv_lengths: ``[B]`` valid keys per row (padding).
        """
        b, t, _ = x_btd.shape
        x = x_btd.astype(self.dtype)
        src = x if context_bsd is None else context_bsd.astype(self.dtype)
        q, k, v = self.project_qkv(x, src)
        if positions_bt is None:
            start = 0 if self.cache is None else self.cache.start()
            positions_bt = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if context_bsd is None:  # cross-attention has no positions to rotate
            q, k = self.positions.rotate(q, k, positions_bt)
        out = self._attend(q, k, v, positions_bt, segment_ids=segment_ids,
                           kv_lengths=kv_lengths, cross=context_bsd is not None)
        return self._project_out(out)

    def project_qkv(self, x_btd: jax.Array, src_bsd: jax.Array):
        """``q [B, T, N, H]`` from ``x`` and ``k, v [B, S, K, H]`` from ``src`` (``x`` itself,
        an encoder's output, or a memory before ``x``): projections, biases, q/k norms, and
        their shardings; positions are applied by the caller."""
        q = rows_dot(x_btd, self.q_dnh[...].astype(self.dtype), 1)
        k = rows_dot(src_bsd, self.k_dkh[...].astype(self.dtype), 1)
        v = rows_dot(src_bsd, self.v_dkh[...].astype(self.dtype), 1)
        if self.q_bias_nh is not None:
            q = q + self.q_bias_nh[...].astype(self.dtype)[None, None]
            k = k + self.k_bias_kh[...].astype(self.dtype)[None, None]
            v = v + self.v_bias_kh[...].astype(self.dtype)[None, None]
        if self.q_norm is not None:  # per head, before positions rotate them
            q, k = self.q_norm(q), self.k_norm(k)
        # Under a mesh: rows over (data, fsdp), heads over tensor (a no-op on one device).
        q = parallel.constrain(q, ("batch", None, "heads", None))
        k = parallel.constrain(k, ("batch", None, "kv_heads", None))
        v = parallel.constrain(v, ("batch", None, "kv_heads", None))
        return q, k, v

    def _attend(self, q_btnh, k_bskh, v_bskh, positions_bt, *, segment_ids, kv_lengths,
                cross: bool) -> jax.Array:
        """Softmax attention through the cache (or none); variants override this."""
        cache = cache_lib.NO_CACHE if self.cache is None else self.cache
        score_mod = self.logits_mod(cross=cross)
        if not cross:  # a scheme whose logits read this call's q and k (DeBERTa's tables)
            score_mod = score_mods.chain(self.positions.qk_score_mod(q_btnh, k_bskh, self),
                                         score_mod)
        return cache.attend(q_btnh, k_bskh, v_bskh, positions_bt, mask=self.mask,
                            scale=self.scale, implementation=self.implementation,
                            positions=self.positions, segment_ids=segment_ids,
                            kv_lengths=kv_lengths, cross=cross, score_mod=score_mod)

    def logits_mod(self, *, cross: bool = False) -> score_mods.ScoreMod | None:
        """This layer's score modifier: the position scheme's (self-attention only), then the
        configured one (the sinks last), bound to this layer's learned parameters: arrays,
        so the kernels take them as leaves and return their gradients."""
        mod = score_mods.chain(None if cross else self.positions.score_mod(), self.score_mod)
        if mod is None or not self.learned_names:
            return mod
        params = {name: getattr(self, name)[...] for name in self.learned_names}
        return mod.bind(params, self.q_dnh[...].shape[1])

    def _project_out(self, out_btnh: jax.Array) -> jax.Array:
        out = rows_dot(out_btnh, self.o_nhd[...].astype(self.dtype), 2)  # [B, T, D]
        if self.o_bias_d is not None:
            out = out + self.o_bias_d[...].astype(self.dtype)[None, None]
        return parallel.constrain(out, ("batch", None, "embed"))
