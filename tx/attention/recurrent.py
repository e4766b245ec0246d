"""Gated linear recurrences as layers of a schedule: RetNet retention, GLA, Mamba-2 (SSD) and
Gated DeltaNet, each in the self-attention slot of a block.

Each keeps, per sequence, a state ``S [K, Dk, Dv]`` (and a short convolution's last inputs)
instead of a growing K/V cache: ``S_t = a_t S_{t-1} + k_t v_t^T`` (``kernels.gated_*``) or the
gated delta rule (``kernels.delta_rule``); outputs ``o_t = S_t^T q_t``. What differs is how
``q, k, v`` and the decay ``a_t = exp(g_t)`` come from the input:

* ``Retention`` (RetNet, Sun et al., 2023, arXiv:2307.08621): a fixed decay per head,
  ``gamma = 1 - 2^-(5..12)``; per-head RMS norm and a swish output gate.
* ``GLA`` (Yang et al., 2024, arXiv:2312.06635): a data-dependent decay per key channel,
  ``g = log_sigmoid(x W_1 W_2 + b) / 16`` (low rank), per-head RMS norm and swish gate.
* ``Mamba2`` (in ``tx.attention.recurrent_ssd``; Dao & Gu, 2024, arXiv:2405.21060): the SSD
  layer: one input projection to the gate ``z``, ``xBC`` and ``dt``; a depthwise causal conv
  and SiLU on ``xBC``; ``q = C``, ``k = B`` (shared by the heads of a group), ``v = x dt``,
  ``g = A dt`` with ``A = -exp(A_log)`` and ``dt = softplus(dt + dt_bias)``; ``y + D x``, then
  ``RMSNorm(y * silu(z))`` per group.
* ``GatedDeltaNet`` (Yang, Kautz & Hatamizadeh, 2025, arXiv:2412.06464): short convs and SiLU
  on q, k, v; L2-normalised q and k; ``beta = sigmoid(x W_b)``; Mamba-2's decay; per-head RMS
  norm and swish output gate.

The decay parameterisations keep ``a_t`` in (0, 1] by construction; a setting that would not
(``gammas`` outside (0, 1], a gate normaliser <= 0) is refused by name. These layers are causal
(decoder schedules): an encoder schedule refuses them. Decoding keeps ``RecurrentState``
(constant size; beams fork and reorder its rows); the paged cache refuses them by name
(``pageable = False``). Training runs through the ``gated`` path of the attention backends
(``xla``: ``kernels.gated_chunked`` / ``kernels.delta_rule``; ``pallas``:
``kernels.gated_linear`` / ``kernels.delta_kernel``); decoding through the chunked ``jnp``
forms from the carried state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tx.attention import calls, patterns, registry
from tx.kernels import masks as masks_lib
from tx.kernels.delta_rule import delta_chunked
from tx.kernels.gated_chunked import gated_chunked
from tx.registry import Field, positive_int

_F32 = jnp.float32


# --- pieces ------------------------------------------------------------------------------------

def param(rngs, shape, names, init=None):
    init = init or nnx.initializers.lecun_normal(in_axis=0, out_axis=tuple(range(1, len(shape))))
    return nnx.Param(nnx.with_partitioning(init, names, eager_sharding=False)(
        rngs.params(), shape, _F32))


def proj(x, w):
    """``x [..., D] @ w [D, ...]`` in x's dtype."""
    return jnp.tensordot(x, w.astype(x.dtype), axes=1)


def rms_norm(x, scale, *, groups: int = 1, eps: float = 1e-6):
    """RMS norm over the last axis in ``groups`` equal parts (fp32), times ``scale``."""
    shape = x.shape
    x = x.astype(_F32).reshape(*shape[:-1], groups, shape[-1] // groups)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x.reshape(shape) * scale.astype(_F32).reshape((1,) * (len(shape) - 1) + (-1,))


def causal_conv(x_btc, w_wc, bias_c, segment_ids, history_bwc):
    """Depthwise causal convolution ``out_t = sum_i w_i x_{t - (W-1) + i}`` over the last
    ``W - 1`` inputs (``history``, zeros at a sequence's start) and this call's; a tap never
    reaches into an earlier packed document. Returns ``(out, new history)``."""
    b, t, c = x_btc.shape
    width = w_wc.shape[0]
    xp = jnp.concatenate([history_bwc.astype(x_btc.dtype), x_btc], axis=1)  # [B, W-1+T, C]
    out = jnp.zeros((b, t, c), _F32)
    if segment_ids is not None:
        seg = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
    for i in range(width):
        tap = xp[:, i:i + t].astype(_F32) * w_wc[i].astype(_F32)[None, None]
        if segment_ids is not None:
            tap = jnp.where((seg[:, i:i + t] == segment_ids)[..., None], tap, 0.0)
        out = out + tap
    if bias_c is not None:
        out = out + bias_c.astype(_F32)[None, None]
    return out.astype(x_btc.dtype), xp[:, xp.shape[1] - (width - 1):]


class RecurrentState(nnx.Module):
    """A recurrent layer's decoding cache: the state ``[B, K, Dk, Dv]`` and the convolution's
    last ``W - 1`` inputs ``[B, W - 1, C]`` in fp32, whatever the number of tokens."""

    def __init__(self, batch: int, heads: int, key_dim: int, value_dim: int,
                 conv_width: int = 1, conv_channels: int = 0):
        self.state = nnx.Cache(jnp.zeros((batch, heads, key_dim, value_dim), _F32))
        self.conv = nnx.Cache(jnp.zeros((batch, max(conv_width - 1, 0), conv_channels), _F32))
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))

    def start(self) -> jax.Array:
        return self.index[...]

    def fork(self, n: int) -> None:
        self.state.set_value(jnp.repeat(self.state[...], n, axis=0))
        self.conv.set_value(jnp.repeat(self.conv[...], n, axis=0))

    def reorder(self, rows: jax.Array) -> None:
        self.state[...] = self.state[...][rows]
        self.conv[...] = self.conv[...][rows]


def _refuse_encoder(name: str) -> None:
    raise ValueError(f"layer_pattern/attention={name!r} in a bidirectional schedule: the "
                     "recurrent layers (tx.attention.recurrent) are causal; use them in a "
                     "decoder (task=lm), or use 'full' / 'favor' in an encoder.")


# --- the layer values --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecurrentSpec:
    """Fields every recurrent layer value has: ``chunk`` (positions per chunk of the parallel
    form; the result does not depend on it)."""

    chunk: int = 64

    def __post_init__(self):
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"recurrent_chunk ({type(self).__name__}.chunk)={self.chunk!r} "
                             "must be an integer >= 1 (positions per chunk), e.g. 64.")

    @property
    def mask(self) -> masks_lib.Mask:
        return masks_lib.Causal()

    def build_attention(self, cfg, *, layer: int, positions=None, rngs: nnx.Rngs):
        if not getattr(cfg.head, "causal", False):
            _refuse_encoder(f"{type(self).__name__}(...) with head={type(cfg.head).__name__}")
        return self.layer_class()(self, cfg, rngs=rngs)

    def state_bytes(self, cfg, batch: int, tokens: int = 0) -> int:
        heads, dk, dv, width, channels = self.state_shape(cfg)
        return 4 * batch * (heads * dk * dv + max(width - 1, 0) * channels)


@dataclasses.dataclass(frozen=True)
class Retention(RecurrentSpec):
    """RetNet retention; ``gammas``: one decay per K/V head in (0, 1] (default RetNet's
    ``1 - 2^-(5..12)`` spread over the heads)."""

    gammas: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        for g in self.gammas:
            if not 0.0 < g <= 1.0:
                raise ValueError(f"Retention.gammas={self.gammas!r}: every decay must lie in "
                                 "(0, 1] (a decay above 1 grows the state without bound, 0 or "
                                 "less has no log); e.g. gammas=(0.9, 0.99).")

    def decays(self, heads: int) -> tuple:
        if self.gammas:
            if len(self.gammas) != heads:
                raise ValueError(f"Retention.gammas has {len(self.gammas)} decays for "
                                 f"num_kv_heads={heads}; give one per K/V head.")
            return self.gammas
        exps = [5.0] if heads == 1 else [5.0 + 7.0 * i / (heads - 1) for i in range(heads)]
        return tuple(1.0 - 2.0 ** -e for e in exps)

    def layer_class(self):
        return RetentionLayer

    def state_shape(self, cfg):
        return cfg.kv_heads, cfg.head_dim, cfg.head_dim, 1, 0


@dataclasses.dataclass(frozen=True)
class GLA(RecurrentSpec):
    """Gated linear attention; ``gate_normalizer`` divides the log-sigmoid decay (GLA's 16:
    decays close to 1); ``gate_rank``: the low-rank decay projection's width."""

    gate_normalizer: float = 16.0
    gate_rank: int = 16

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.gate_normalizer, (int, float)) and self.gate_normalizer > 0
                and math.isfinite(self.gate_normalizer)):
            raise ValueError(f"GLA.gate_normalizer={self.gate_normalizer!r} must be a finite "
                             "number > 0: log_sigmoid(x) / normaliser keeps the decay in (0, 1]"
                             " only for a positive normaliser; e.g. 16.")
        if isinstance(self.gate_rank, bool) or not isinstance(self.gate_rank, int) or \
                self.gate_rank < 1:
            raise ValueError(f"GLA.gate_rank={self.gate_rank!r} must be an integer >= 1.")

    def layer_class(self):
        return GLALayer

    def state_shape(self, cfg):
        return cfg.kv_heads, cfg.head_dim, cfg.head_dim, 1, 0


@dataclasses.dataclass(frozen=True)
class GatedDeltaNet(RecurrentSpec):
    """Gated DeltaNet; ``conv``: the short convolutions' width on q, k and v."""

    conv: int = 4

    def __post_init__(self):
        super().__post_init__()
        positive_conv(self)

    def layer_class(self):
        return GatedDeltaNetLayer

    def state_shape(self, cfg):
        n, k, h = cfg.attention.num_heads, cfg.kv_heads, cfg.head_dim
        return k, h, h, self.conv, (n + 2 * k) * h


def positive_conv(spec) -> None:
    if isinstance(spec.conv, bool) or not isinstance(spec.conv, int) or spec.conv < 1:
        raise ValueError(f"recurrent_conv ({type(spec).__name__}.conv)={spec.conv!r} must be "
                         "an integer >= 1 (the short convolution's width), e.g. 4.")


# --- the layers --------------------------------------------------------------------------------

class RecurrentLayer(nnx.Module):
    """What every recurrent layer shares: the slot's call signature, the decoding state, the
    short convolution and the recurrence through the backends."""

    pageable = False  # its cache is a state, not K/V pages

    def __init__(self, spec, cfg):
        self.spec = spec
        self.state_dims = spec.state_shape(cfg)
        self.dtype = cfg.dtype
        self.implementation = tuple(cfg.attention.implementation)
        self.mask = masks_lib.Causal()
        self.cache = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        """The constant-size state (fp32 whatever ``kv`` asks of the softmax layers)."""
        self.cache = nnx.data(RecurrentState(batch, *self.state_dims))

    def __call__(self, x_btd, positions_bt=None, *, context_bsd=None, segment_ids=None,
                 kv_lengths=None):
        """``positions_bt`` is not used (the decay orders the tokens)."""
        if context_bsd is not None:
            raise ValueError(f"{type(self).__name__} is a self-attention layer; "
                             "cross-attention stays softmax.")
        seg = None if segment_ids is None or self.cache is not None else segment_ids[0]
        return self.mix(x_btd.astype(self.dtype), seg, kv_lengths)

    def conv(self, x_btc, w_wc, bias_c, seg):
        b, _, c = x_btc.shape
        history = jnp.zeros((b, w_wc.shape[0] - 1, c), _F32) if self.cache is None else \
            self.cache.conv[...]
        out, history = causal_conv(x_btc, w_wc, bias_c, seg, history)
        if self.cache is not None:
            self.cache.conv[...] = history.astype(_F32)
        return out

    def recur(self, q, k, v, log_decay, seg, kv_lengths, beta=None):
        """``o [B, T, N, Dv]`` in v's dtype: through the backends, or from the decoding
        state (which it advances)."""
        chunk = self.spec.chunk
        if self.cache is None:
            return registry.serve("gated", calls.Gated(
                q, k, v, log_decay, chunk=chunk, segment_ids=seg, kv_lengths=kv_lengths,
                beta=beta), self.implementation)
        init = self.cache.state[...]
        if beta is None:
            out, state = gated_chunked(q, k, v, log_decay, chunk=chunk, kv_lengths=kv_lengths,
                                       initial_state=init, final_state=True)
        else:
            out, state = delta_chunked(q, k, v, log_decay, beta, chunk=chunk,
                                       kv_lengths=kv_lengths, initial_state=init,
                                       final_state=True)
        self.cache.state[...] = state
        self.cache.index[...] = self.cache.index[...] + q.shape[1]
        return out


class _GatedOut(RecurrentLayer):
    """Projections ``q [D,N,H]``, ``k, v [D,K,H]``, the swish output gate ``[D,N,H]``, a
    per-head RMS norm and the output projection ``[N,H,D]`` (RetNet, GLA, Gated DeltaNet)."""

    def __init__(self, spec, cfg, *, rngs: nnx.Rngs):
        super().__init__(spec, cfg)
        d, n, k, h = cfg.d_model, cfg.attention.num_heads, cfg.kv_heads, cfg.head_dim
        self.q_dnh = param(rngs, (d, n, h), ("embed", "heads", "head_dim"))
        self.k_dkh = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v_dkh = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.gate_dnh = param(rngs, (d, n, h), ("embed", "heads", "head_dim"))
        self.norm_h = param(rngs, (h,), ("head_dim",), nnx.initializers.ones_init())
        self.o_nhd = param(rngs, (n, h, d), ("heads", "head_dim", "embed"),
                            nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))

    def qkv(self, x):
        return proj(x, self.q_dnh[...]), proj(x, self.k_dkh[...]), proj(x, self.v_dkh[...])

    def out(self, x, o_btnh):
        o = rms_norm(o_btnh, self.norm_h[...]) * jax.nn.silu(
            proj(x, self.gate_dnh[...]).astype(_F32))
        return jnp.einsum("BTNH,NHD->BTD", o.astype(x.dtype), self.o_nhd[...].astype(x.dtype))


class RetentionLayer(_GatedOut):
    def __init__(self, spec: Retention, cfg, *, rngs: nnx.Rngs):
        super().__init__(spec, cfg, rngs=rngs)
        # Fixed decays: static floats, not parameters or state.
        self.log_gammas = tuple(math.log(g) for g in spec.decays(cfg.kv_heads))

    def mix(self, x, seg, kv_lengths):
        q, k, v = self.qkv(x)
        q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        b, t = x.shape[:2]
        g = jnp.broadcast_to(jnp.asarray(self.log_gammas, _F32)[None, None], (b, t, k.shape[2]))
        return self.out(x, self.recur(q, k, v, g, seg, kv_lengths))


class GLALayer(_GatedOut):
    def __init__(self, spec: GLA, cfg, *, rngs: nnx.Rngs):
        super().__init__(spec, cfg, rngs=rngs)
        d, k, h, r = cfg.d_model, cfg.kv_heads, cfg.head_dim, spec.gate_rank
        self.decay_dr = param(rngs, (d, r), ("embed", None))
        self.decay_rkh = param(rngs, (r, k, h), (None, "kv_heads", "head_dim"))
        self.decay_bias_kh = param(rngs, (k, h), ("kv_heads", "head_dim"),
                                    nnx.initializers.zeros_init())

    def mix(self, x, seg, kv_lengths):
        q, k, v = self.qkv(x)
        q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        logits = proj(proj(x, self.decay_dr[...]), self.decay_rkh[...]).astype(_F32) + \
            self.decay_bias_kh[...][None, None]
        g = jax.nn.log_sigmoid(logits) / self.spec.gate_normalizer        # [B,T,K,H] <= 0
        return self.out(x, self.recur(q, k, v, g, seg, kv_lengths))


def mamba_decay_params(rngs, heads: int, names=("kv_heads",)):
    """``A_log = log(1..heads)`` and ``dt_bias = softplus^-1(dt)``, dt log-uniform in
    [1e-3, 1e-1] (Mamba-2's initialisation)."""
    a_log = jnp.log(jnp.arange(1, heads + 1, dtype=_F32))
    u = jax.random.uniform(rngs.params(), (heads,), _F32)
    dt = jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    make = lambda v: nnx.Param(nnx.with_partitioning(  # noqa: E731
        lambda *_: v, names, eager_sharding=False)(None, None, None))
    return make(a_log), make(dt_bias)


class GatedDeltaNetLayer(_GatedOut):
    def __init__(self, spec: GatedDeltaNet, cfg, *, rngs: nnx.Rngs):
        super().__init__(spec, cfg, rngs=rngs)
        d, n, k, h = cfg.d_model, cfg.attention.num_heads, cfg.kv_heads, cfg.head_dim
        channels = (n + 2 * k) * h
        self.conv_wc = param(rngs, (spec.conv, channels), (None, "mlp"),
                              nnx.initializers.lecun_normal(in_axis=0, out_axis=()))
        self.beta_dk = param(rngs, (d, k), ("embed", "kv_heads"))
        self.dt_dk = param(rngs, (d, k), ("embed", "kv_heads"))
        self.a_log_k, self.dt_bias_k = mamba_decay_params(rngs, k)

    def mix(self, x, seg, kv_lengths):
        q, k, v = self.qkv(x)
        b, t, n, h = q.shape
        kh = k.shape[2]
        qkv = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)],
                              axis=-1)
        qkv = jax.nn.silu(self.conv(qkv, self.conv_wc[...], None, seg))
        q, k, v = jnp.split(qkv, [n * h, (n + kh) * h], axis=-1)
        q, k = (y.reshape(b, t, -1, h).astype(_F32) for y in (q, k))
        q = q * jax.lax.rsqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6) * h ** -0.5
        k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
        v = v.reshape(b, t, kh, h)
        beta = jax.nn.sigmoid(proj(x, self.beta_dk[...]).astype(_F32))
        dt = jax.nn.softplus(proj(x, self.dt_dk[...]).astype(_F32) +
                             self.dt_bias_k[...][None, None])
        g = -jnp.exp(self.a_log_k[...])[None, None] * dt                    # [B,T,K] <= 0
        o = self.recur(q.astype(x.dtype), k.astype(x.dtype), v, g, seg, kv_lengths, beta=beta)
        return self.out(x, o)


# -- flag names: 'retnet', 'gla', 'gdn' (and 'mamba2' in recurrent_ssd) -----------------------
CHUNK = Field("recurrent_chunk", 64, "recurrent layers: positions per chunk of the parallel "
              "form", check=positive_int)
CONV = Field("recurrent_conv", 4, "Gated DeltaNet / Mamba-2: short convolution width",
             check=positive_int)

_FLAGS = {
    "retnet": (Retention, (CHUNK,), lambda f: Retention(chunk=f.recurrent_chunk)),
    "gla": (GLA, (CHUNK,), lambda f: GLA(chunk=f.recurrent_chunk)),
    "gdn": (GatedDeltaNet, (CHUNK, CONV),
            lambda f: GatedDeltaNet(chunk=f.recurrent_chunk, conv=f.recurrent_conv)),
}


def register(name: str, cls, fields, make) -> None:
    """Registers the flag name of a recurrent layer value: ``make(flags) -> value``."""
    def build(f, *, causal: bool):
        if not causal:
            _refuse_encoder(name)
        return make(f)

    def prints(v, causal: bool):
        if type(v) is not cls or not causal:
            return None
        values = {fl.name: getattr(v, {"recurrent_chunk": "chunk", "recurrent_conv": "conv",
                                        "ssm_state": "state", "ssm_expand": "expand"}[fl.name])
                  for fl in fields}
        return values if make(type("F", (), values)) == v else None

    patterns.PATTERNS.register(name, build, fields=fields, prints=prints)


for _name, (_cls, _fields, _make) in _FLAGS.items():
    register(_name, _cls, _fields, _make)
