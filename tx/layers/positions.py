"""Position signals: absolute (sinusoidal, learned), rotary, and additive attention biases.

Two halves:

* modules, all :class:`Positions`: one per tower, shared by its attention layers, answering
  four hooks (`embed` the token embeddings, `rotate` queries and keys, `score_mod` a
  `kernels.score_mods` value for the logits that every implementation applies in place,
  `bias` a dense `[B, N, T, S]` logits bias that only the `xla` path takes), each the
  identity by default, so a scheme overrides only what it changes;
* values, the config's leaves (`RoPE(base)`, `Learned(max_len)`, `Sinusoidal()`,
  `T5Buckets(num_buckets, max_distance)`, `ALiBiSlopes()`, `NoPositions()`), each building its
  module. (Their logits modifiers are `kernels.score_mods.T5Bias` and `.ALiBi`.)
  A new scheme is one file: a value with `build` and a `Positions` module (see
  `examples/extending/`), registered for flags with `tx.flags.register_positions`.

Every function takes int32 position arrays rather than assuming `arange`: positions
restart per document when sequences are packed and are offset during decoding.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.kernels import score_mods
from tx.kernels.score_mods import alibi_slopes, t5_bucket  # noqa: F401  (re-exported)
from tx.layers.rope_scaling import RopeScaling, dynamic_inv_freq, static_inv_freq
from tx.registry import Field, Registry, positive_int


class Positions(nnx.Module):
    """A tower's position module; the base class adds no position information (NoPE)."""

    def embed(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """The token embeddings `[B, T, D]` with absolute positions mixed in."""
        return x_btd

    def rotate(self, q_btnh: jax.Array, k_btkh: jax.Array,
               positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Queries `[B, T, N, H]` and the new keys `[B, T, K, H]` (both at `positions_bt`) as
        attention should see them; a scheme may treat the two differently (xPos)."""
        return q_btnh, k_btkh

    def score_mod(self) -> score_mods.ScoreMod | None:
        """The logits modifier of this scheme (T5 buckets, ALiBi), evaluated at the positions
        the attention reports, inside the kernels too; None when it has none."""
        return None

    def bias(self, q_pos_bt: jax.Array, kv_pos_bs: jax.Array) -> jax.Array | None:
        """A dense additive logits bias `[B, N, T, S]` (fp32), or None. Only the `xla` path
        takes it; prefer `score_mod`, which the Pallas kernels apply without the tensor."""
        return None

    def qk_score_mod(self, q_btnh: jax.Array, k_bskh: jax.Array,
                     attn) -> score_mods.ScoreMod | None:
        """A logits modifier built from this self-attention call's q, k and the layer `attn`
        (its projections), e.g. DeBERTa's disentangled tables; None when it has none."""
        return None


def sinusoidal(positions_bt: jax.Array, d_model: int) -> jax.Array:
    """Vaswani et al. (2017): `pe[2i] = sin(p / 10000^(2i/D))`, `pe[2i+1] = cos(...)`.

    Returns `[B, T, D]` float32 (sin/cos interleaved, as in the paper's formula).
    """
    if d_model % 2:
        raise ValueError(f"{d_model=} must be even for sinusoidal positions")
    inv_freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float32) / d_model)  # [D/2]
    angles_btd2 = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    pairs = jnp.stack([jnp.sin(angles_btd2), jnp.cos(angles_btd2)], axis=-1)  # [B,T,D/2,2]
    return pairs.reshape(*positions_bt.shape, d_model)


class SinusoidalPositions(Positions):
    """Module wrapper around `sinusoidal`, so models can swap position modules."""

    def __init__(self, d_model: int):
        self.d_model = d_model

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        return sinusoidal(positions_bt, self.d_model)

    def embed(self, x_btd, positions_bt):
        # Vaswani et al.: token embeddings scaled up to the size of the sines.
        return x_btd * math.sqrt(self.d_model) + self(positions_bt).astype(x_btd.dtype)


class LearnedPositions(Positions):
    """Learned absolute table `[max_len, D]`.

    Positions outside `[0, max_len)` are clamped to the nearest row (a shape check cannot
    see traced position values under jit), so callers must keep positions below max_len.
    """

    def __init__(self, max_len: int, d_model: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        # Small stddev (GPT-2's 0.02) keeps positions from dominating the token embedding.
        # eager_sharding=False: logical names, mapped to a mesh later by axis rules.
        init = nnx.with_partitioning(nnx.initializers.normal(stddev=0.02), (None, 'embed'),
                                     eager_sharding=False)
        self.table = nnx.Param(init(rngs.params(), (max_len, d_model), param_dtype))
        self.max_len = max_len
        self.dtype = dtype

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], positions_bt, axis=0, mode='clip').astype(self.dtype)

    def embed(self, x_btd, positions_bt):
        return x_btd + self(positions_bt).astype(x_btd.dtype)


class Rotary(Positions):
    """Rotary embedding (Su et al., 2021), rotate-half convention (GPT-NeoX / Llama).

    Dimension `i` is paired with `i + H/2` and the pair is rotated by angle
    `p * base^(-2i/H)`, so `q(p)·k(p')` depends only on `p - p'`. Angles and the
    rotation run in float32 (bf16 angles lose the low bits of large positions).
    `scaling` stretches the frequencies for long contexts (see `rope_scaling.py`).
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0,
                 scaling: RopeScaling | None = None):
        if head_dim % 2:
            raise ValueError(f"{head_dim=} must be even for RoPE (dimensions rotate in pairs)")
        self.head_dim = head_dim
        self.base = base
        self.scaling = scaling
        # A tuple: static under jit, not a parameter.
        self.inv_freq = tuple(float(f) for f in static_inv_freq(head_dim, base, scaling))

    def _inv_freq(self, positions_bt: jax.Array) -> jax.Array:
        if self.scaling is not None and self.scaling.dynamic:
            return dynamic_inv_freq(self.head_dim, self.base, self.scaling, positions_bt)
        return jnp.asarray(self.inv_freq, jnp.float32)

    def tables(self, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``cos, sin [B, T, 1, H/2]`` (fp32, scaled by the attention factor)."""
        inv_freq = self._inv_freq(positions_bt)  # [H/2]
        angles_bth = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
        gain = 1.0 if self.scaling is None else self.scaling.attention_factor
        return ((jnp.cos(angles_bth) * gain)[:, :, None, :],
                (jnp.sin(angles_bth) * gain)[:, :, None, :])

    @staticmethod
    def rotate_with(x_btnh: jax.Array, cos_bt1h: jax.Array, sin_bt1h: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h,
                                   x2 * cos_bt1h + x1 * sin_bt1h], axis=-1)
        return rotated.astype(x_btnh.dtype)

    def __call__(self, x_btnh: jax.Array, positions_bt: jax.Array) -> jax.Array:
        return self.rotate_with(x_btnh, *self.tables(positions_bt))

    def rotate(self, q_btnh, k_btkh, positions_bt):
        tables = self.tables(positions_bt)  # once for q and k
        return self.rotate_with(q_btnh, *tables), self.rotate_with(k_btkh, *tables)


class LayerRotaries(Positions):
    """One ``Rotary`` per entry of a schedule, cycled over the layers (``LayerRoPE``): a
    tower hands layer ``i`` its own (``layer(i)``), so local and global layers turn at
    different bases (Gemma 3). Adds nothing itself."""

    def __init__(self, rotaries: tuple[Rotary, ...]):
        self.rotaries = nnx.List(list(rotaries))

    def layer(self, i: int) -> Rotary:
        return self.rotaries[i % len(self.rotaries)]


class T5RelativeBias(Positions):
    """Learned per-head scalar bias indexed by the T5 bucket of `kv_pos - q_pos`."""

    def __init__(self, num_heads: int, *, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # eager_sharding=False: logical names, mapped to a mesh later by axis rules.
        init = nnx.with_partitioning(nnx.initializers.normal(stddev=0.02),
                                     ('relpos_buckets', 'heads'), eager_sharding=False)
        self.table = nnx.Param(init(rngs.params(), (num_buckets, num_heads), param_dtype))
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def __call__(self, q_pos_bt: jax.Array, kv_pos_bs: jax.Array) -> jax.Array:
        """Returns the additive bias `[B, N, T, S]` in float32."""
        rel_bts = kv_pos_bs[:, None, :] - q_pos_bt[:, :, None]
        bucket_bts = t5_bucket(rel_bts, num_buckets=self.num_buckets,
                               max_distance=self.max_distance, bidirectional=self.bidirectional)
        bias_btsn = jnp.take(self.table[...].astype(jnp.float32), bucket_bts, axis=0)
        return jnp.transpose(bias_btsn, (0, 3, 1, 2))

    def score_mod(self):
        return score_mods.T5Bias(self.table[...], num_buckets=self.num_buckets,
                                 max_distance=self.max_distance,
                                 bidirectional=self.bidirectional)


class ALiBiBias(Positions):
    """Linear distance penalty `-slope_n * |q_pos - kv_pos|` (no parameters)."""

    def __init__(self, num_heads: int):
        self.slopes = alibi_slopes(num_heads)  # a tuple: static, not a parameter

    def __call__(self, q_pos_bt: jax.Array, kv_pos_bs: jax.Array) -> jax.Array:
        """Returns the additive bias `[B, N, T, S]` in float32."""
        slopes_n = jnp.asarray(self.slopes, jnp.float32)
        distance_bts = jnp.abs(q_pos_bt[:, :, None] - kv_pos_bs[:, None, :]).astype(jnp.float32)
        return -slopes_n[None, :, None, None] * distance_bts[:, None, :, :]

    def score_mod(self):
        return score_mods.ALiBi(jnp.asarray(self.slopes, jnp.float32))


# -- values: the config's leaves ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NoPositions:
    """No position signal at all (NoPE): causal masks alone order a decoder's tokens."""

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return Positions()


@dataclasses.dataclass(frozen=True)
class Sinusoidal:
    """Fixed sines added to the scaled token embeddings (Vaswani et al., 2017)."""

    absolute = True  # embedded per position: no memory of earlier segments (memory_length)

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return SinusoidalPositions(cfg.d_model)


@dataclasses.dataclass(frozen=True)
class Learned:
    """A learned table of `max_len` absolute positions (GPT-2, BERT)."""

    absolute = True  # embedded per position: no memory of earlier segments (memory_length)

    max_len: int = 512

    def __post_init__(self):
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or \
                self.max_len < 1:
            raise ValueError(f"positions.max_len={self.max_len!r}: learned positions need a "
                             "positive integer at least the longest sequence.")

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return LearnedPositions(self.max_len, cfg.d_model, dtype=cfg.dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary embeddings with base `base`, optionally scaled for long contexts.

    `trained_len` only records the context a checkpoint was trained for (Hugging Face's
    `max_position_embeddings`, which some scalings read); RoPE itself has no length limit.
    """

    base: float = 10000.0
    scaling: RopeScaling | None = None
    trained_len: int | None = None

    def __post_init__(self):
        if not self.base > 1:
            raise ValueError(f"positions.base={self.base!r}: RoPE's base must be > 1, e.g. "
                             "10000.0.")
        if self.scaling is not None and not isinstance(self.scaling, RopeScaling):
            raise ValueError(f"positions.scaling={self.scaling!r}: give a "
                             "tx.layers.RopeScaling or None.")

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return Rotary(cfg.head_dim, base=self.base, scaling=self.scaling)


@dataclasses.dataclass(frozen=True)
class LayerRoPE:
    """A ``RoPE`` per layer: ``schedule`` (``RoPE`` values) cycled over the layers as
    ``attention.masks`` is, so local and global layers may differ in base and scaling
    (Gemma 3: sliding layers ``RoPE(10_000)``, global ones ``RoPE(1_000_000, scaling)``)."""

    schedule: tuple

    def __post_init__(self):
        if not isinstance(self.schedule, tuple):
            object.__setattr__(self, "schedule", tuple(self.schedule))
        if not self.schedule or not all(isinstance(r, RoPE) for r in self.schedule):
            raise ValueError(f"positions.schedule={self.schedule!r}: give one or more RoPE "
                             "values, cycled over the layers.")

    def layer(self, i: int) -> RoPE:
        return self.schedule[i % len(self.schedule)]

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return LayerRotaries(tuple(r.build(cfg, causal=causal, rngs=rngs)
                                   for r in self.schedule))


@dataclasses.dataclass(frozen=True)
class T5Buckets:
    """T5's learned per-head bias over `num_buckets` relative-distance buckets."""

    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self):
        if isinstance(self.num_buckets, bool) or not isinstance(self.num_buckets, int) or \
                self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"positions.num_buckets={self.num_buckets!r}: use an even number "
                             ">= 4 (half for each direction in an encoder), e.g. 32.")
        if not isinstance(self.max_distance, int) or self.max_distance <= self.num_buckets // 2:
            raise ValueError(f"positions.max_distance={self.max_distance!r}: must exceed "
                             f"num_buckets // 2 = {self.num_buckets // 2}, e.g. 128.")

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return T5RelativeBias(cfg.num_heads, num_buckets=self.num_buckets,
                              max_distance=self.max_distance, bidirectional=not causal,
                              rngs=rngs)


@dataclasses.dataclass(frozen=True)
class ALiBiSlopes:
    """Linear distance penalties with per-head geometric slopes (Press et al., 2022)."""

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> Positions:
        return ALiBiBias(cfg.num_heads)


# -- flag names (tx.flags): each scheme declares the fields it reads and prints itself back ------
def _check_flags(f) -> None:
    if f.rope_scaling is not None and (f.positions != "rope" or
                                       not isinstance(f.rope_scaling, RopeScaling)):
        raise ValueError(f"rope_scaling={f.rope_scaling!r}: give a tx.layers.RopeScaling, with "
                         "positions='rope'.")
    if (f.rope_bases or f.rope_scalings) and f.positions != "layer_rope":
        raise ValueError(f"rope_bases={f.rope_bases!r}, rope_scalings={f.rope_scalings!r}: "
                         "set with positions='layer_rope' (else use rope_base).")
    if f.positions == "layer_rope":
        if not f.rope_bases:
            raise ValueError("rope_bases=(): positions='layer_rope' needs one base per "
                             "schedule entry, e.g. 10000,1000000.")
        if f.rope_scalings and (len(f.rope_scalings) != len(f.rope_bases) or not all(
                s is None or isinstance(s, RopeScaling) for s in f.rope_scalings)):
            raise ValueError(f"rope_scalings={f.rope_scalings!r}: give a tx.layers.RopeScaling "
                             f"or None per entry of rope_bases={f.rope_bases!r}, or ().")


def _bases(name, value) -> str | None:
    try:
        ok = all(float(b) > 1 for b in value)
    except (TypeError, ValueError):
        ok = False
    return None if ok else "give RoPE bases > 1, e.g. 10000,1000000."


def _layer_rope(f) -> LayerRoPE:
    scalings = f.rope_scalings or (None,) * len(f.rope_bases)
    return LayerRoPE(tuple(RoPE(float(b), s, f.max_len) for b, s in zip(f.rope_bases, scalings)))


def _prints_layer_rope(v):
    if type(v) is not LayerRoPE or len({r.trained_len for r in v.schedule}) != 1:
        return False
    scalings = tuple(r.scaling for r in v.schedule)
    return dict(rope_bases=tuple(r.base for r in v.schedule),
                rope_scalings=scalings if any(scalings) else (),
                max_len=v.schedule[0].trained_len)


SCHEMES = Registry("position scheme", "positions", check=_check_flags,
                   register_hint="tx.flags.register_positions(name, fn, fields=...)")
MAX_LEN = Field("max_len", 512, "learned positions' table size; RoPE's trained length",
                check=positive_int)
ROPE_FIELDS = (Field("rope_base", 10000.0, "RoPE's theta: pair i turns at p * base^(-2i/H)",
                     check=lambda n, v: None if isinstance(v, (int, float)) and v > 1 else
                     "must be > 1, e.g. 10000.0."),
               Field("rope_scaling", None, "long-context RoPE frequencies: a "
                     "tx.layers.RopeScaling (linear, dynamic, llama3, yarn) or None",
                     type=RopeScaling), MAX_LEN)
LAYER_ROPE_FIELDS = (
    Field("rope_bases", (), "layer_rope: RoPE's base per schedule entry, cycled over the layers "
          "as layer_pattern is (Gemma 3: five 10000s, then 1000000)", check=_bases),
    Field("rope_scalings", (), "layer_rope: a tx.layers.RopeScaling or None per entry of "
          "rope_bases; empty: none"), MAX_LEN)
T5_FIELDS = (Field("t5_buckets", 32, "T5 relative-position buckets", check=positive_int),
             Field("t5_max_distance", 128, "T5: distances beyond share the last bucket",
                   check=positive_int))


def _prints(cls, **fields):
    """``prints`` for a value class: its attributes renamed to flag fields."""
    return lambda v: type(v) is cls and {flag: getattr(v, attr) for flag, attr in fields.items()}


SCHEMES.register("rope", lambda f: RoPE(f.rope_base, f.rope_scaling, f.max_len),
                 fields=ROPE_FIELDS,
                 prints=_prints(RoPE, rope_base="base", rope_scaling="scaling",
                                max_len="trained_len"))
SCHEMES.register("layer_rope", _layer_rope, fields=LAYER_ROPE_FIELDS,
                 prints=_prints_layer_rope)
SCHEMES.register("sinusoidal", lambda f: Sinusoidal(), prints=_prints(Sinusoidal))
SCHEMES.register("learned", lambda f: Learned(f.max_len), fields=(MAX_LEN,),
                 prints=_prints(Learned, max_len="max_len"))
SCHEMES.register("t5", lambda f: T5Buckets(f.t5_buckets, f.t5_max_distance), fields=T5_FIELDS,
                 prints=_prints(T5Buckets, t5_buckets="num_buckets",
                                t5_max_distance="max_distance"))
SCHEMES.register("alibi", lambda f: ALiBiSlopes(), prints=_prints(ALiBiSlopes))
SCHEMES.register("none", lambda f: NoPositions(), prints=_prints(NoPositions))
