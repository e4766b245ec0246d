"""The Mamba-2 layer (SSD; Dao & Gu, 2024, "Transformers are SSMs", arXiv:2405.21060) in the
self-attention slot of a block; the value ``tx.attention.recurrent.Mamba2`` builds it.

One input projection gives the gate ``z [E]``, ``xBC [E + 2 G N]`` and ``dt [heads]``
(``E = expand * d_model`` inner channels in heads of ``P = head_dim``, ``G`` groups of heads
sharing ``B`` and ``C`` of state size ``N``). ``xBC`` passes a depthwise causal convolution and
SiLU; then per head the SSD recurrence ``h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t^T``,
``y_t = h_t^T C_t + D x_t``: a gated linear recurrence with ``q = C``, ``k = B``,
``v = dt x`` and log decay ``A dt <= 0`` (``A = -exp(A_log)``, ``dt = softplus(dt + dt_bias)``).
The output is ``RMSNorm(y * silu(z))`` (per group) through the output projection. Parameter
names follow the reference implementation, so checkpoints map one to one
(``tx.interop.hf.mamba2``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tx.attention.recurrent import (CHUNK, CONV, RecurrentLayer, RecurrentSpec,
                                    mamba_decay_params, param, positive_conv, proj, register,
                                    rms_norm)
from tx.registry import Field, positive_int

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Mamba2(RecurrentSpec):
    """The Mamba-2 (SSD) layer: ``state`` (N, the state size per head), ``expand`` (inner
    width / d_model), ``groups`` (of heads sharing B and C), ``conv`` (width), heads of
    ``cfg.head_dim`` channels."""

    state: int = 16
    expand: int = 2
    groups: int = 1
    conv: int = 4
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        positive_conv(self)
        for name in ("state", "expand", "groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Mamba2.{name}={v!r} must be an integer >= 1.")

    def dims(self, cfg):
        inner = self.expand * cfg.d_model
        if inner % cfg.head_dim or (inner // cfg.head_dim) % self.groups:
            raise ValueError(f"Mamba2: expand * d_model = {inner} must split into heads of "
                             f"head_dim={cfg.head_dim} whose number divides by groups="
                             f"{self.groups}; change head_dim, expand or groups.")
        return inner, inner // cfg.head_dim

    def layer_class(self):
        return Mamba2Layer

    def state_shape(self, cfg):
        inner, heads = self.dims(cfg)
        return heads, self.state, cfg.head_dim, self.conv, inner + 2 * self.groups * self.state



class Mamba2Layer(RecurrentLayer):
    def __init__(self, spec: Mamba2, cfg, *, rngs: nnx.Rngs):
        super().__init__(spec, cfg)
        d, p = cfg.d_model, cfg.head_dim
        inner, heads = spec.dims(cfg)
        gn = spec.groups * spec.state
        self.inner, self.heads, self.head_dim = inner, heads, p
        channels = inner + 2 * gn
        self.in_proj_dz = param(rngs, (d, 2 * inner + 2 * gn + heads), ("embed", "mlp"))
        self.conv_wc = param(rngs, (spec.conv, channels), (None, "mlp"),
                              nnx.initializers.lecun_normal(in_axis=0, out_axis=()))
        self.conv_bias_c = param(rngs, (channels,), ("mlp",), nnx.initializers.zeros_init())
        self.a_log_h, self.dt_bias_h = mamba_decay_params(rngs, heads, ("heads",))
        self.d_skip_h = param(rngs, (heads,), ("heads",), nnx.initializers.ones_init())
        self.norm_e = param(rngs, (inner,), ("mlp",), nnx.initializers.ones_init())
        self.out_proj_ed = param(rngs, (inner, d), ("mlp", "embed"))

    def mix(self, x, seg, kv_lengths):
        spec = self.spec
        b, t, _ = x.shape
        e, gn, heads, p = self.inner, spec.groups * spec.state, self.heads, self.head_dim
        zxbcdt = proj(x, self.in_proj_dz[...])
        z, xbc, dt = jnp.split(zxbcdt, [e, 2 * e + 2 * gn], axis=-1)
        xbc = jax.nn.silu(self.conv(xbc, self.conv_wc[...], self.conv_bias_c[...], seg))
        xs, b_in, c_in = jnp.split(xbc, [e, e + gn], axis=-1)
        xs = xs.reshape(b, t, heads, p)
        rep = heads // spec.groups  # heads of a group share its B and C
        b_in = jnp.repeat(b_in.reshape(b, t, spec.groups, spec.state), rep, axis=2)
        c_in = jnp.repeat(c_in.reshape(b, t, spec.groups, spec.state), rep, axis=2)
        dt = jax.nn.softplus(dt.astype(_F32) + self.dt_bias_h[...][None, None])  # [B,T,heads]
        g = -jnp.exp(self.a_log_h[...])[None, None] * dt                    # <= 0
        v = (xs.astype(_F32) * dt[..., None]).astype(x.dtype)
        y = self.recur(c_in, b_in, v, g, seg, kv_lengths)                     # [B,T,heads,P]
        y = y.astype(_F32) + xs.astype(_F32) * self.d_skip_h[...][None, None, :, None]
        y = y.reshape(b, t, e) * jax.nn.silu(z.astype(_F32))
        y = rms_norm(y, self.norm_e[...], groups=spec.groups, eps=spec.norm_eps)
        return proj(y.astype(x.dtype), self.out_proj_ed[...])


class _NoMLP(nnx.Module):
    def __call__(self, x_btd):
        return jnp.zeros_like(x_btd)


@dataclasses.dataclass(frozen=True)
class NoMLP:
    """A block without its MLP (Mamba's blocks are ``x + mixer(norm(x))`` only): the MLP
    sub-layer adds zeros. The block still holds that sub-layer's norm, unused."""

    def build(self, d_model: int, *, dropout_rate: float = 0.0, dtype=jnp.float32,
              rngs: nnx.Rngs) -> nnx.Module:
        return _NoMLP()


# -- flag name: 'mamba2' in attention / layer_pattern ------------------------------------------
SSM_STATE = Field("ssm_state", 16, "Mamba-2: state size N per head", check=positive_int)
SSM_EXPAND = Field("ssm_expand", 2, "Mamba-2: inner width / d_model", check=positive_int)
register("mamba2", Mamba2, (CHUNK, CONV, SSM_STATE, SSM_EXPAND),
         lambda f: Mamba2(chunk=f.recurrent_chunk, conv=f.recurrent_conv, state=f.ssm_state,
                          expand=f.ssm_expand))
