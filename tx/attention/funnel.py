"""Funnel Transformer attention (Dai et al., 2020, arXiv:2006.03236): relative attention with
learned biases, and the pooling geometry of its blocks.

Funnel's score between query ``i`` and key ``j`` (head dim ``H``, model dim ``D``, scale
``s = H ** -0.5``, queries already scaled, ``q = s * x W_q``) is the sum of three terms:

* content: ``(q_i + s * b_content) . k_j``;
* position: ``(q_i + s * b_position) W_r . r(p_i - p_j)``, ``r(d) = [sin(d f), cos(d f)]``
  over ``D / 2`` frequencies ``f``, ``W_r [D, N, H]``;
* token type: ``(q_i + s * b_segment) . seg[same(i, j)]``, ``same`` when the types match or
  either token is a [CLS] (type 2);

with the position and token-type terms zeroed on the [CLS] row and column when the [CLS]
token is kept out of the pooling (``separate_cls``). Hugging Face computes the position term
by a "relative shift" gather or in a "factorized" form; both equal the formula above.

The angle-difference identities write ``r(p_i - p_j)`` as a dot product of a query-side and a
key-side feature vector (``u . r = (u_s sin_i + u_c cos_i) cos_j + (u_c sin_i - u_s cos_i)
sin_j``), and the token-type term is ``a_i - (a_i - b_i) (1{t_i=0} 1{t_j=1} + 1{t_i=1}
1{t_j=0})``. So the whole score is one dot product of augmented q and k,

    q' = [q + s b_content, pos_q (D), type_q (3)],   k' = [k, pos_k (D), type_k (3)],

and this layer runs as plain softmax attention (scale 1) through tx's backends
(``registry.serve("dense", ...)``: the Pallas and cpu kernels, the xla reference), with v
zero-padded to the augmented width. Token types are 0 and 1 (segments A, B) and 2 ([CLS]).

The pooling geometry (positions, which rows survive a pooling, the valid lengths) is static
numpy; ``tx.models.funnel`` builds the blocks from it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx import parallel
from tx.attention import calls, registry
from tx.attention.layer import rows_dot
from tx.kernels import masks as masks_lib

CLS_TYPE = 2  # Funnel's token type of [CLS]: the same segment as every other token


# -- pooling geometry (static) ------------------------------------------------------------------
def pool_index(t: int, separate_cls: bool) -> np.ndarray:
    """The rows of a length-``t`` stage that represent each pooled row (for positions and
    token types): with ``separate_cls`` the [CLS] row, then the first of each pair
    ``(1, 2), (3, 4)...`` (the last row, unpaired, is dropped); else ``0, 2, 4...``."""
    if separate_cls:
        return np.concatenate([[0], np.arange(1, t - 1, 2)])
    return np.arange(0, t, 2)


def check_length(t: int, num_blocks: int, *, where: str) -> None:
    """Each of ``num_blocks - 1`` poolings halves the length exactly: ``t`` must be a
    multiple of ``2 ** (num_blocks - 1)``, with at least two rows left (Hugging Face skips
    a pooling of two rows or fewer, which would change the geometry)."""
    stride = 2 ** (num_blocks - 1)
    if t % stride or (num_blocks > 1 and t // stride < 2):
        raise ValueError(f"{where}: sequence length {t} with funnel_blocks of {num_blocks} "
                         f"blocks: each of the {num_blocks - 1} poolings halves the length, so "
                         f"it must be a multiple of {stride} and at least {2 * stride}; pad "
                         "the batch (or set data.seq_len) to such a length, or use fewer "
                         "blocks.")


def pool_hidden(x_btd: jax.Array, separate_cls: bool, kind: str) -> jax.Array:
    """``[B, T, D] -> [B, T / 2, D]``: the mean (or max) of each pair of rows; the [CLS] row
    is kept as it is and the last row dropped when ``separate_cls``."""
    b, t, d = x_btd.shape
    reduce = jnp.mean if kind == "mean" else jnp.max
    if not separate_cls:
        return reduce(x_btd.reshape(b, t // 2, 2, d), axis=2)
    pairs = reduce(x_btd[:, 1:t - 1].reshape(b, t // 2 - 1, 2, d), axis=2)
    return jnp.concatenate([x_btd[:, :1], pairs], axis=1)


def pool_lengths(lengths_b: jax.Array, separate_cls: bool) -> jax.Array:
    """Valid rows after a pooling of right-padded rows: a pooled row is valid when both rows
    it pools are (Hugging Face min-pools the attention mask)."""
    if separate_cls:
        return jnp.where(lengths_b > 0, 1 + (lengths_b - 1) // 2, 0)
    return lengths_b // 2


def upsample(x_bmd: jax.Array, t: int, stride: int, separate_cls: bool) -> jax.Array:
    """``[B, M, D] -> [B, T, D]``, each pooled row repeated ``stride`` times back over the rows
    it covers; with ``separate_cls`` the [CLS] row maps to itself and the rows no pooling
    covered (the truncated tail) are zero."""
    if not separate_cls:
        return x_bmd[:, np.arange(t) // stride]
    i = np.arange(t)
    covered = (i == 0) | (i - 1 < (x_bmd.shape[1] - 1) * stride)
    index = np.where(i == 0, 0, np.minimum(1 + (i - 1) // stride, x_bmd.shape[1] - 1))
    return x_bmd[:, index] * jnp.asarray(covered, x_bmd.dtype)[None, :, None]


# -- the layer ----------------------------------------------------------------------------------
def _param(rngs, init, shape, names):
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, jnp.float32))


def _fan_in(in_axis, out_axis):
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=in_axis, out_axis=out_axis)


class FunnelAttention(nnx.Module):
    """``(queries [B, T, D], keys/values [B, S, D]) -> [B, T, D]``: Funnel's relative
    multi-head attention (MHA: ``N`` heads of width ``H``). q has no bias; k, v and the output
    projection have one when ``bias`` (as Funnel's)."""

    pageable = False  # an encoder layer: no decoding cache

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 scale: float | None = None, separate_cls: bool = True,
                 implementation=(), dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model % 2:
            raise ValueError(f"d_model={d_model}: Funnel's sinusoidal relative positions pair "
                             "a sin and a cos per frequency; use an even d_model.")
        registry.check(implementation)
        d, n, h = d_model, num_heads, head_dim
        self.q_dnh = _param(rngs, _fan_in(0, (1, 2)), (d, n, h), ("embed", "heads", "head_dim"))
        self.k_dkh = _param(rngs, _fan_in(0, (1, 2)), (d, n, h), ("embed", "heads", "head_dim"))
        self.v_dkh = _param(rngs, _fan_in(0, (1, 2)), (d, n, h), ("embed", "heads", "head_dim"))
        self.o_nhd = _param(rngs, _fan_in((0, 1), 2), (n, h, d), ("heads", "head_dim", "embed"))
        zeros = nnx.initializers.zeros_init()
        self.k_bias_kh = _param(rngs, zeros, (n, h), ("heads", "head_dim")) if bias else None
        self.v_bias_kh = _param(rngs, zeros, (n, h), ("heads", "head_dim")) if bias else None
        self.o_bias_d = _param(rngs, zeros, (d,), ("embed",)) if bias else None
        # Funnel's learned relative-attention parameters (HF r_w_bias, r_r_bias, r_kernel,
        # r_s_bias, seg_embed), small uniform values as Funnel initialises them.
        small = nnx.initializers.uniform(0.1)
        self.content_bias_nh = _param(rngs, small, (n, h), ("heads", "head_dim"))
        self.position_bias_nh = _param(rngs, small, (n, h), ("heads", "head_dim"))
        self.position_dnh = _param(rngs, small, (d, n, h), ("embed", "heads", "head_dim"))
        self.segment_bias_nh = _param(rngs, small, (n, h), ("heads", "head_dim"))
        self.segment_snh = _param(rngs, small, (2, n, h), (None, "heads", "head_dim"))
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.separate_cls = separate_cls
        self.implementation = tuple(implementation)
        self.dtype = dtype
        self.cache = None
        self.mask = masks_lib.Full()

    def __call__(self, q_btd: jax.Array, kv_bsd: jax.Array, *, q_positions: np.ndarray,
                 kv_positions: np.ndarray, q_types_bt: jax.Array, kv_types_bs: jax.Array,
                 kv_lengths: jax.Array | None = None) -> jax.Array:
        """``q_positions [T]`` / ``kv_positions [S]`` (numpy) are the rows' positions in the
        input; ``*_types`` their token types (0, 1, or 2 for [CLS]); ``kv_lengths [B]`` the
        valid keys per row (padding)."""
        dt, s = self.dtype, self.scale
        x, src = q_btd.astype(dt), kv_bsd.astype(dt)
        q = rows_dot(x, self.q_dnh[...].astype(dt), 1) * s  # [B, T, N, H]
        k = rows_dot(src, self.k_dkh[...].astype(dt), 1)  # [B, S, N, H]
        v = rows_dot(src, self.v_dkh[...].astype(dt), 1)
        if self.k_bias_kh is not None:
            k = k + self.k_bias_kh[...].astype(dt)[None, None]
            v = v + self.v_bias_kh[...].astype(dt)[None, None]
        q = parallel.constrain(q, ("batch", None, "heads", None))
        k = parallel.constrain(k, ("batch", None, "heads", None))
        b, t, n, h = q.shape
        srclen = k.shape[1]

        def bias(p):
            return (p[...] * s).astype(dt)[None, None]

        # Position term, query and key features of r(p_i - p_j).
        u = jnp.einsum("btnh,dnh->btnd", q + bias(self.position_bias_nh),
                       self.position_dnh[...].astype(dt))  # [B, T, N, D]
        half = u.shape[-1] // 2
        u_sin, u_cos = u[..., :half], u[..., half:]
        sin_q, cos_q = self._sinusoid(q_positions, half)  # [T, D/2]
        sin_k, cos_k = self._sinusoid(kv_positions, half)
        sin_q, cos_q = sin_q[None, :, None], cos_q[None, :, None]
        pos_q = jnp.concatenate([u_sin * sin_q + u_cos * cos_q,
                                 u_cos * sin_q - u_sin * cos_q], -1)
        pos_k = jnp.broadcast_to(jnp.concatenate([cos_k, sin_k], -1)[None, :, None],
                                 (b, srclen, n, 2 * half))
        # Token-type term: a (same segment) or b (different) per query row.
        seg = jnp.einsum("btnh,snh->btns", q + bias(self.segment_bias_nh),
                         self.segment_snh[...].astype(dt))  # [B, T, N, 2]
        diff, same = seg[..., 0], seg[..., 1]
        qt = [(q_types_bt == c).astype(dt)[..., None] for c in (0, 1)]
        kt = [(kv_types_bs == c).astype(dt)[..., None] for c in (0, 1)]
        type_q = jnp.stack([same, (diff - same) * qt[0], (diff - same) * qt[1]], -1)
        type_k = jnp.broadcast_to(jnp.stack([jnp.ones_like(kt[0]), kt[1], kt[0]], -1),
                                  (b, srclen, n, 3))
        if self.separate_cls:  # no position or type term on the [CLS] row and column
            pos_q, type_q = pos_q * self._not_cls(t), type_q * self._not_cls(t)
            pos_k, type_k = pos_k * self._not_cls(srclen), type_k * self._not_cls(srclen)
        q_aug = jnp.concatenate([q + bias(self.content_bias_nh), pos_q, type_q], -1)
        k_aug = jnp.concatenate([k, pos_k.astype(dt), type_k], -1)
        # A width the kernels tile well; zero columns change no dot product.
        width = augmented_width(2 * half, h)
        pad = [(0, 0)] * 3
        q_aug = jnp.pad(q_aug, pad + [(0, width - q_aug.shape[-1])])
        k_aug = jnp.pad(k_aug, pad + [(0, width - k_aug.shape[-1])])
        v_aug = jnp.pad(v, pad + [(0, width - h)])
        out = registry.serve("dense", calls.Dense(q_aug, k_aug, v_aug, mask=self.mask,
                                                  kv_lengths=kv_lengths, scale=1.0),
                             self.implementation)[..., :h]
        out = rows_dot(out.astype(dt), self.o_nhd[...].astype(dt), 2)  # [B, T, D]
        if self.o_bias_d is not None:
            out = out + self.o_bias_d[...].astype(dt)[None, None]
        return parallel.constrain(out, ("batch", None, "embed"))

    def _sinusoid(self, positions: np.ndarray, half: int):
        """``sin(p f)``, ``cos(p f)`` ``[len, D/2]`` at Funnel's frequencies
        ``f_k = 10000 ** (-k / (D / 2))``, computed in float64 on the host."""
        freq = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / half)
        angle = np.asarray(positions, np.float64)[:, None] * freq[None]
        return (jnp.asarray(np.sin(angle), self.dtype), jnp.asarray(np.cos(angle), self.dtype))

    def _not_cls(self, length: int) -> jax.Array:
        return jnp.asarray(np.arange(length) != 0, self.dtype)[None, :, None, None]


def augmented_width(d_model: int, head_dim: int) -> int:
    """The head width the backends see: ``H + D + 3``, rounded up to a multiple of 8."""
    return 8 * math.ceil((head_dim + d_model + 3) / 8)
