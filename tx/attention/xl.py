"""Transformer-XL relative positions (Dai et al., 2019, arXiv:1901.02860, section 3.3).

The paper's score of query ``i`` and key ``j`` in one head is

    A_ij = (a) q_i·k_j + (b) q_i·W_r R_{i-j} + (c) u·k_j + (d) v·W_r R_{i-j}
         = (q_i + u)·k_j + (q_i + v)·W_r R_{i-j},

with ``R_d = [sin(d ω_m) | cos(d ω_m)]`` (``ω_m = 10000^(-2m/D)``, ``m < D/2``, ``D`` the
width of ``R``: the model width, as in the paper), ``W_r [D, N, H]`` and the learned biases
``u, v [N, H]``, all per layer. The positional terms (b) + (d) depend on ``i - j`` only through
sines and cosines, and ``sin((i-j)ω) = sin iω cos jω - cos iω sin jω`` (cosine alike), so with
``α_m = (q_i + v)·W_r[sin m]`` and ``β_m = (q_i + v)·W_r[cos m]``

    (b) + (d) = Σ_m cos jω_m (α_m sin iω_m + β_m cos iω_m)
              + sin jω_m (β_m sin iω_m - α_m cos iω_m):

a dot product of a function of ``(q_i, i)`` with one of ``j`` alone. Hence the whole score is
ordinary dot-product attention over widened vectors

    q~_i = [q_i + u | α sin iω + β cos iω | β sin iω - α cos iω]   [N, H + D]
    k~_j = [k_j     | cos jω              | sin jω             ]   [K, H + D]

and XL runs through every backend unchanged (xla, the Pallas flash kernel, the cpu kernel),
its decoding caches storing ``k~``. The logits scale stays ``H ** -0.5`` (the paper's, of the
unwidened head). Costs: each head's q·k is ``D`` dims wider (``H + D`` instead of ``H``);
values are zero-padded to that width for backends that need one head dim
(``tx.attention.memory.MemoryAttention``), so ``p·v`` is too. Rounding: the angles are
absolute, ``iω`` in fp32, so a product at positions near ``P`` carries ``~P * 2^-24`` relative
error in each factor that the direct ``(i - j)ω`` does not: measured against the equations, the
scores' relative error is 7e-8 at positions < 20, 1e-5 near 10^3, 5e-5 near 10^4, 5e-4 near
10^5. A memory keeps positions local to a segment and its memory (``M + T``), so training never
reaches large ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.attention import patterns
from tx.kernels import masks
from tx.layers import positions as positions_lib
from tx.registry import Field, non_negative_int, positive_int


def frequencies(width: int) -> np.ndarray:
    """``ω_m = 10000^(-2m/width)`` for ``m < width / 2`` (float32)."""
    if width % 2:
        raise ValueError(f"{width=} must be even: XL's R pairs a sine with a cosine.")
    return (10000.0 ** (-np.arange(0, width, 2, dtype=np.float32) / width)).astype(np.float32)


class XLLayerPositions(positions_lib.Positions):
    """One layer's ``W_r``, ``u`` and ``v``; widens q and k as the module docstring says."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=0, out_axis=(1, 2))
        init = nnx.with_partitioning(init, ("embed", "heads", "head_dim"), eager_sharding=False)
        self.r_dnh = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
        # The original code starts u and v small and random; zeros would work as well.
        bias = nnx.with_partitioning(nnx.initializers.normal(stddev=0.02),
                                     ("heads", "head_dim"), eager_sharding=False)
        self.u_nh = nnx.Param(bias(rngs.params(), (num_heads, head_dim), param_dtype))
        self.v_nh = nnx.Param(bias(rngs.params(), (num_heads, head_dim), param_dtype))
        self.omega = tuple(float(w) for w in frequencies(d_model))  # static, no parameter

    @property
    def extra_width(self) -> int:
        """Dims q and k gain per head (R's width)."""
        return 2 * len(self.omega)

    def _angles(self, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``sin, cos [B, T, 1, D/2]`` of ``p ω`` in fp32."""
        angles = positions_bt.astype(jnp.float32)[:, :, None, None] * \
            jnp.asarray(self.omega, jnp.float32)[None, None, None, :]
        return jnp.sin(angles), jnp.cos(angles)

    def widen_q(self, q_btnh: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """``q~ [B, T, N, H + D]``."""
        q = q_btnh.astype(jnp.float32)
        u, v = (p[...].astype(jnp.float32)[None, None] for p in (self.u_nh, self.v_nh))
        ab = jnp.einsum("btnh,dnh->btnd", q + v, self.r_dnh[...].astype(jnp.float32))
        alpha, beta = jnp.split(ab, 2, axis=-1)  # the sin rows of W_r, then the cos rows
        sin, cos = self._angles(positions_bt)
        out = jnp.concatenate([q + u, alpha * sin + beta * cos, beta * sin - alpha * cos], -1)
        return out.astype(q_btnh.dtype)

    def widen_k(self, k_bskh: jax.Array, positions_bs: jax.Array) -> jax.Array:
        """``k~ [B, S, K, H + D]``: the same ``[cos jω | sin jω]`` for every K/V head."""
        sin, cos = self._angles(positions_bs)
        b, s, kh, _ = k_bskh.shape
        tail = jnp.broadcast_to(jnp.concatenate([cos, sin], -1), (b, s, kh, self.extra_width))
        return jnp.concatenate([k_bskh, tail.astype(k_bskh.dtype)], -1)

    def rotate_apart(self, q_btnh, k_bskh, q_positions_bt, kv_positions_bs):
        """q at its positions and k at its own (a memory's keys precede the queries)."""
        return self.widen_q(q_btnh, q_positions_bt), self.widen_k(k_bskh, kv_positions_bs)

    def rotate(self, q_btnh, k_btkh, positions_bt):
        return self.rotate_apart(q_btnh, k_btkh, positions_bt, positions_bt)


class XLPositions(positions_lib.Positions):
    """A tower's XL module: one :class:`XLLayerPositions` per layer (``layer(i)``), as the
    paper gives every layer its own ``W_r`` (and, untied as Hugging Face's ``untie_r``, its
    own ``u``, ``v``). Embeddings get nothing: XL has no absolute positions."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, head_dim: int, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([XLLayerPositions(d_model, num_heads, head_dim,
                                                 param_dtype=param_dtype, rngs=rngs)
                                for _ in range(num_layers)])

    def layer(self, i: int) -> XLLayerPositions:
        return self.layers[i]


@dataclasses.dataclass(frozen=True)
class XL:
    """Transformer-XL relative positions (``positions=xl``): per-layer ``W_r``, ``u``, ``v``
    over sinusoids of width ``d_model``."""

    def cache_width(self, cfg) -> int:
        """Dims a decoding cache stores per K/V head: ``k~`` is ``H + D`` wide, and values are
        zero-padded to it (``tx.attention.memory.MemoryAttention``)."""
        return cfg.head_dim + cfg.d_model

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> XLPositions:
        if cfg.d_model % 2:
            raise ValueError(f"d_model={cfg.d_model}: positions=xl pairs sines with cosines "
                             "over d_model; use an even d_model.")
        return XLPositions(cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim, rngs=rngs)


positions_lib.SCHEMES.register("xl", lambda f: XL(), prints=lambda v: type(v) is XL and {})

# The one-pass view of a recurrent run as a pattern (``layer_pattern=segment_memory``): what a
# model with ``memory_length=M`` over segments of ``L`` computes, in one call.
SEGMENT_FIELDS = (
    Field("xl_segment", 64, "segment_memory pattern: the segment length L", check=positive_int),
    Field("xl_memory", 64, "segment_memory pattern: positions before its segment's start a "
          "query also sees (a recurrent run's memory_length)", check=non_negative_int))
patterns.PATTERNS.register(
    "segment_memory", lambda f, *, causal: masks.SegmentMemory(f.xl_segment, f.xl_memory),
    fields=SEGMENT_FIELDS,
    prints=lambda m, causal: type(m) is masks.SegmentMemory and dict(xl_segment=m.segment,
                                                                     xl_memory=m.memory))
