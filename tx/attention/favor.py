"""FAVOR+ linear attention (Performer; Choromanski et al., 2021, arXiv:2009.14794).

Softmax attention weighs key ``s`` for query ``t`` by ``exp(q_t · k_s)`` (q and k each scaled
by ``scale ** 0.5``). FAVOR+ replaces that kernel by a dot product of positive random features,

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(F),    E[phi(q) · phi(k)] = exp(q · k),

with ``W [F, H]`` rows drawn Gaussian, orthogonalised in blocks of ``H`` (QR) and rescaled to
Gaussian norms, which lowers the variance at the same ``F``. Attention then costs
``O(T F H)`` instead of ``O(T^2 H)``: bidirectionally ``phi(Q) (phi(K)^T V)``; causally a
prefix sum, computed chunkwise (``kernels.linear_attention``: exact quadratic form inside a
chunk, a carried ``[K, F, H]`` state between chunks). Decoding keeps that state instead of a
growing KV cache (``LinearStateCache``: constant size per sequence). The ``xla`` path and
decoding are the decay-gated recurrence of the recurrent layers with no decay (``a_t = 1``,
``kernels.linear_chunked`` over ``kernels.gated_chunked``); the Pallas path is its own kernel
(``kernels.linear_attention``, with the normaliser's backward and bf16 precision split).

Stabilisation: a query's features are shifted by their row maximum (a per-query constant
that cancels between numerator and denominator); keys are not shifted (a shift would have to
be the same for every key a query sees, which decoding cannot know in advance); features are
computed in fp32 and offset by a tiny ``EPS`` so a denominator never vanishes.

Redrawing: ``Favor(redraw_every=n)`` draws a new ``W`` every ``n`` training calls of the layer
(``model.train()``), from ``fold_in(seed, layer, draw)``. ``W`` and the call counter are model
state outside the parameters, so checkpoints hold them and a resumed run continues with the
same draws.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tx.kernels import masks as masks_lib
from tx.attention import patterns
from tx.registry import Field, non_negative_int, positive_int
from tx.attention import registry
from tx.attention.layer import Attention
from tx.kernels.linear_chunked import linear_attention_chunked
from tx.layers.positions import Positions

EPS = 1e-6


class FeatureDraw(nnx.Variable):
    """A FAVOR+ layer's random projection and draw counter: not trained, checkpointed."""


@functools.partial(jax.jit, static_argnums=(1, 2))  # compiled: eager QR costs ~1 s per layer
def orthogonal_gaussian(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    """``[F, H]`` rows: blocks of ``H`` orthonormal rows (QR of a Gaussian matrix), each row
    rescaled to the norm of an independent Gaussian vector, so every row is marginally
    ``N(0, I)`` and rows within a block are exactly orthogonal."""
    blocks = -(-num_features // dim)
    block_key, norm_key = jax.random.split(key)
    gauss = jax.random.normal(block_key, (blocks, dim, dim), jnp.float32)
    q, r = jnp.linalg.qr(gauss)                                   # columns orthonormal
    # QR fixes the signs of R's diagonal by convention, which biases Q's directions; flipping
    # columns to make that diagonal positive gives a uniformly random (Haar) rotation, so
    # every row points in a uniform direction and the estimator stays unbiased.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), jnp.float32),
                            axis=-1)
    return rows * norms[:, None]


def positive_features(x: jax.Array, w_fh: jax.Array, *, query: bool) -> jax.Array:
    """``phi(x)`` ``[..., F]`` in fp32 for ``x [..., H]`` (already scaled)."""
    x = x.astype(jnp.float32)
    u = jnp.einsum("...H,FH->...F", x, w_fh)
    u = u - jnp.sum(x * x, axis=-1, keepdims=True) / 2
    if query:  # a per-query constant: cancels between numerator and denominator
        u = u - jax.lax.stop_gradient(u.max(axis=-1, keepdims=True))
    return (jnp.exp(u) + EPS) / math.sqrt(w_fh.shape[0])


def _build(layer_cls, spec, cfg, layer: int, positions, rngs: nnx.Rngs):
    """``layer_cls(spec, ...)`` with the projections' options of ``cfg.attention``."""
    a = cfg.attention
    return layer_cls(spec, cfg.d_model, a.num_heads, a.kv_heads, cfg.head_dim, layer=layer,
                     implementation=a.implementation, positions=positions, use_bias=a.bias,
                     scale=a.scale, dtype=cfg.dtype, rngs=rngs)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


@dataclasses.dataclass(frozen=True)
class Favor:
    """A FAVOR+ layer in the per-layer schedule (``attention.masks``).

    Attributes:
      num_features: random features ``F``.
      causal: prefix (decoder) or bidirectional (encoder) attention.
      chunk: tokens per chunk of the causal form (any size gives the same result).
      redraw_every: training calls between redraws of the features; 0 keeps the first draw.
      seed: seeds the draws (each layer folds in its index).
      orthogonal: block-orthogonal rows (FAVOR+); False draws i.i.d. Gaussian rows.
      pattern: a mask to compute instead of ``causal``: only ``Causal()`` or ``Full()``, the
        two a prefix sum or a total sum can express.
    """

    num_features: int = 256
    causal: bool = True
    chunk: int = 64
    redraw_every: int = 0
    seed: int = 0
    orthogonal: bool = True
    pattern: masks_lib.Mask | None = None

    def __post_init__(self):
        if self.pattern is not None:
            if not isinstance(self.pattern, (masks_lib.Causal, masks_lib.Full)):
                raise ValueError(f"Favor.pattern={self.pattern!r}: a linear (FAVOR+) layer "
                                 "computes causal or full attention only (a prefix or a total "
                                 "sum); use a softmax layer for windows and sparse patterns, "
                                 "e.g. layer_pattern=local,local,local,favor.")
            object.__setattr__(self, "causal", isinstance(self.pattern, masks_lib.Causal))
        _check_positive("linear_features (Favor.num_features)", self.num_features)
        _check_positive("linear_chunk (Favor.chunk)", self.chunk)
        if isinstance(self.redraw_every, bool) or not isinstance(self.redraw_every, int) or \
                self.redraw_every < 0:
            raise ValueError(f"linear_redraw (Favor.redraw_every)={self.redraw_every!r} must "
                             "be an integer >= 0 (0: never redraw).")

    @property
    def mask(self) -> masks_lib.Mask:
        """The pattern this layer computes exactly (for tools that draw the schedule)."""
        return masks_lib.Causal() if self.causal else masks_lib.Full()

    def build_attention(self, cfg, *, layer: int, positions=None, rngs: nnx.Rngs):
        return _build(FavorAttention, self, cfg, layer, positions, rngs)

    def state_bytes(self, cfg, batch: int, tokens: int = 0) -> int:
        """Bytes of the decoding state: ``[B, K, F, H]`` plus the normaliser ``[B, K, F]``,
        whatever the number of tokens."""
        return 4 * batch * cfg.kv_heads * self.num_features * (cfg.head_dim + 1)


class FavorAttention(Attention):
    """The attention layer's projections with FAVOR+ in place of softmax."""

    def __init__(self, favor: Favor, d_model: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, *, layer: int, positions=None, **kwargs):
        if positions is not None and _has_bias(positions):
            raise ValueError(f"positions={type(positions).__name__} adds a bias to the "
                             "logits, which a linear (FAVOR+) layer cannot express; use "
                             "positions=rope or none with linear layers.")
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, mask=favor.mask,
                         positions=positions, **kwargs)
        self.favor = favor
        self.key = jax.random.fold_in(jax.random.key(favor.seed), layer)
        self.features_fh = FeatureDraw(self._draw(0))
        self.calls = FeatureDraw(jnp.zeros((), jnp.int32))
        self.deterministic = False  # model.train() / model.eval() flip it, as for Dropout

    def _draw(self, index) -> jax.Array:
        key = jax.random.fold_in(self.key, index)
        h = self.q_dnh[...].shape[-1]
        if self.favor.orthogonal:
            return orthogonal_gaussian(key, self.favor.num_features, h)
        return jax.random.normal(key, (self.favor.num_features, h), jnp.float32)

    def _maybe_redraw(self) -> None:
        every = self.favor.redraw_every
        if self.deterministic or not every:
            return
        calls = self.calls[...] + 1
        self.calls[...] = calls
        self.features_fh[...] = jax.lax.cond(calls % every == 0,
                                             lambda: self._draw(calls // every),
                                             lambda: self.features_fh[...])

    pageable = False  # its cache is a state, not K/V pages

    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        """The constant-size state (fp32 whatever ``kv`` asks of the softmax layers)."""
        k, h = self.k_dkh[...].shape[1:]
        self.cache = nnx.data(LinearStateCache(batch, k, self.favor.num_features, h))

    def _attend(self, q_btnh, k_bskh, v_bskh, positions_bt, *, segment_ids, kv_lengths,
                cross: bool) -> jax.Array:
        if cross:
            raise ValueError("a FAVOR+ layer is a self-attention layer; cross-attention stays "
                             "softmax.")
        if self.cache is not None:  # decoding: the constant-size state
            return self.cache.step(*self.features(q_btnh, k_bskh), v_bskh).astype(q_btnh.dtype)
        self._maybe_redraw()
        q_f, k_f = self.features(q_btnh, k_bskh)
        q_ids = kv_ids = None
        if segment_ids is not None:
            q_ids, kv_ids = segment_ids
        out = registry.linear_attend(q_f, k_f, v_bskh, causal=self.favor.causal,
                                     segment_ids=q_ids, kv_segment_ids=kv_ids,
                                     kv_lengths=kv_lengths, chunk=self.favor.chunk,
                                     implementation=self.implementation)
        return out.astype(q_btnh.dtype)

    def features(self, q_btnh, k_btkh):
        """``phi(q)``, ``phi(k)`` with the logits' scale split evenly between them."""
        h = q_btnh.shape[-1]
        root = (h ** -0.5 if self.scale is None else self.scale) ** 0.5
        w = jax.lax.stop_gradient(self.features_fh[...])
        return (positive_features(q_btnh * root, w, query=True),
                positive_features(k_btkh * root, w, query=False))


def _has_bias(positions) -> bool:
    """Whether a position module adds logits (T5, ALiBi): probe it on one position."""
    pos = jnp.zeros((1, 1), jnp.int32)
    return positions.bias(pos, pos) is not None or positions.score_mod() is not None or \
        type(positions).qk_score_mod is not Positions.qk_score_mod  # DeBERTa's tables


# --- decoding: a constant-size state ------------------------------------------------------------

def causal_with_state(q_f, k_f, v, s_bkfh, z_bkf):
    """Causal linear attention of ``T`` new tokens after a state: the exact quadratic form
    among the new tokens (one chunk) plus their queries against the carried state, through the
    same recurrence as training (``kernels.linear_chunked``: the gated one with no decay).
    Returns the output ``[B, T, N, H]`` (fp32) and the state after them."""
    f32 = jnp.float32
    out, (s_bkfh, z_bkf) = linear_attention_chunked(
        q_f.astype(f32), k_f.astype(f32), v.astype(f32), chunk=q_f.shape[1],
        initial_state=(s_bkfh, z_bkf), final_state=True)
    return out, s_bkfh, z_bkf


class LinearStateCache(nnx.Module):
    """A FAVOR+ layer's decoding cache: ``S [B, K, F, H]`` (sum of ``phi(k) v^T``) and
    ``z [B, K, F]`` (sum of ``phi(k)``) in fp32, whatever the sequence length. Beams fork
    and reorder its rows like a contiguous cache's."""

    def __init__(self, batch: int, num_kv_heads: int, num_features: int, head_dim: int):
        names = ("batch", "kv_heads", None, "head_dim")
        self.s = nnx.Cache(jnp.zeros((batch, num_kv_heads, num_features, head_dim),
                                     jnp.float32), out_sharding=names, eager_sharding=False)
        self.z = nnx.Cache(jnp.zeros((batch, num_kv_heads, num_features), jnp.float32),
                           out_sharding=names[:3], eager_sharding=False)
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))

    def start(self) -> jax.Array:
        return self.index[...]

    def step(self, q_f, k_f, v):
        """Attends ``T`` new tokens' features over the state, then adds them to it."""
        out, self.s[...], self.z[...] = causal_with_state(q_f, k_f, v, self.s[...],
                                                          self.z[...])
        self.index[...] = self.index[...] + q_f.shape[1]
        return out

    def fork(self, n: int) -> None:
        self.s.set_value(jnp.repeat(self.s[...], n, axis=0))
        self.z.set_value(jnp.repeat(self.z[...], n, axis=0))

    def reorder(self, rows: jax.Array) -> None:
        self.s[...] = self.s[...][rows]
        self.z[...] = self.z[...][rows]


# --- hybrid: exact local softmax plus a linear global path ---------------------------------------

@dataclasses.dataclass(frozen=True)
class LocalGlobal:
    """A layer of local softmax attention (``local``: a window mask) plus a FAVOR+ path over
    every key (``favor``), mixed per head by a learned gate, ``sigmoid(g) * global +
    (1 - sigmoid(g)) * local`` (``g`` starts at 0), as Infini-attention (Munkhdalai et al.,
    2024) mixes its local and compressive-memory reads. Near keys are attended exactly, far
    ones through the constant-size state."""

    local: masks_lib.Mask
    favor: Favor = Favor()

    def __post_init__(self):
        if self.local.band() is None:
            raise ValueError(f"LocalGlobal.local={self.local!r}: give a window (a banded mask, "
                             "e.g. Local(63)); the global path covers the rest.")

    def build_attention(self, cfg, *, layer: int, positions=None, rngs: nnx.Rngs):
        return _build(LocalGlobalAttention, self, cfg, layer, positions, rngs)

    def state_bytes(self, cfg, batch: int, tokens: int) -> int:
        """The FAVOR+ state plus a rolling K/V window (in the compute dtype)."""
        from tx.attention.cache import rolling_window  # noqa: PLC0415 (avoid a cycle)
        window = rolling_window(self.local) or tokens
        itemsize = jnp.dtype(cfg.dtype).itemsize
        return self.favor.state_bytes(cfg, batch, tokens) + \
            2 * batch * min(window, tokens) * cfg.kv_heads * cfg.head_dim * itemsize


class LocalGlobalAttention(FavorAttention):
    """Local softmax attention and a FAVOR+ global path, gated per head."""

    def __init__(self, spec: LocalGlobal, d_model: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, *, layer: int, **kwargs):
        super().__init__(spec.favor, d_model, num_heads, num_kv_heads, head_dim, layer=layer,
                         **kwargs)
        self.mask = spec.local
        self.gate_n = nnx.Param(jnp.zeros((num_heads,), jnp.float32))

    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        from tx.attention.cache import make_cache  # noqa: PLC0415 (avoid a cycle)
        k, h = self.k_dkh[...].shape[1:]
        self.cache = nnx.data(_LocalGlobalCache(
            make_cache(self.mask, batch, max_len, k, h, dtype=dtype or self.dtype, kv=kv),
            LinearStateCache(batch, k, self.favor.num_features, h)))

    def _attend(self, q_btnh, k_bskh, v_bskh, positions_bt, *, segment_ids, kv_lengths,
                cross: bool) -> jax.Array:
        if self.cache is None:
            local = Attention._attend(self, q_btnh, k_bskh, v_bskh, positions_bt,
                                      segment_ids=segment_ids, kv_lengths=kv_lengths,
                                      cross=cross)
            glob = FavorAttention._attend(self, q_btnh, k_bskh, v_bskh, positions_bt,
                                          segment_ids=segment_ids, kv_lengths=kv_lengths,
                                          cross=cross)
        else:
            local = self.cache.window.attend(
                q_btnh, k_bskh, v_bskh, positions_bt, mask=self.mask, scale=self.scale,
                implementation=self.implementation, positions=self.positions,
                score_mod=self.logits_mod())
            glob = self.cache.state.step(*self.features(q_btnh, k_bskh), v_bskh)
        gate = jax.nn.sigmoid(self.gate_n[...])[None, None, :, None]      # [1, 1, N, 1]
        out = gate * glob.astype(jnp.float32) + (1 - gate) * local.astype(jnp.float32)
        return out.astype(q_btnh.dtype)


class _LocalGlobalCache(nnx.Module):
    """A rolling (or contiguous) K/V window for the local path and the FAVOR+ state."""

    def __init__(self, window, state: LinearStateCache):
        self.window, self.state = window, state

    def start(self) -> jax.Array:
        return self.state.start()

    def fork(self, n: int) -> None:
        self.window.fork(n)
        self.state.fork(n)

    def reorder(self, rows: jax.Array) -> None:
        self.window.reorder(rows)
        self.state.reorder(rows)


# -- flag names: 'favor' and 'local_favor' in attention / layer_pattern -------------------------
_FIELDS = (Field("linear_features", 256, "FAVOR+ random features", check=positive_int),
           Field("linear_chunk", 64, "FAVOR+: tokens per chunk of the causal form",
                 check=positive_int),
           Field("linear_redraw", 0, "FAVOR+: training calls between feature redraws (0: "
                 "fixed)", check=non_negative_int))


def _favor(f, *, causal: bool) -> Favor:
    return Favor(f.linear_features, causal=causal, chunk=f.linear_chunk,
                 redraw_every=f.linear_redraw)


def _favor_fields(v, causal: bool) -> dict | None:
    if type(v) is not Favor:
        return None
    fields = dict(linear_features=v.num_features, linear_chunk=v.chunk,
                  linear_redraw=v.redraw_every)
    rebuilt = Favor(v.num_features, causal=causal, chunk=v.chunk, redraw_every=v.redraw_every)
    return fields if v == rebuilt else None


def _local_favor_fields(v, causal: bool) -> dict | None:
    if type(v) is not LocalGlobal:
        return None
    local, favor = patterns.PATTERNS.spell(v.local, causal), _favor_fields(v.favor, causal)
    if local is None or local[0] != "local" or favor is None:
        return None
    return {**local[1], **favor}


patterns.PATTERNS.register("favor", _favor, fields=_FIELDS, prints=_favor_fields)
# Local softmax plus a gated FAVOR+ path over every key, in one layer.
patterns.PATTERNS.register(
    "local_favor", lambda f, *, causal: LocalGlobal(patterns.window(f, causal),
                                                    _favor(f, causal=causal)),
    fields=(patterns.WINDOW,) + _FIELDS, prints=_local_favor_fields)
