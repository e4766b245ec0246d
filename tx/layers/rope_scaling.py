"""RoPE frequency scaling for contexts longer than pre-training: linear, dynamic NTK, Llama 3,
YaRN.

Each variant changes only the per-pair inverse frequencies ``[H/2]`` (and, for YaRN, a factor
on cos/sin that sharpens attention); the rotation itself is unchanged. ``RopeScaling`` is a
frozen dataclass, so a ``ModelConfig`` holding one stays hashable for ``jit``.

* ``linear`` (Chen et al., 2023, position interpolation): every frequency divided by ``factor``.
* ``dynamic`` (NTK-aware, /u/bloc97 and /u/emozilla): the base grows with the current length
  ``L = max(positions) + 1`` once it passes ``original_max_len``:
  ``base * (factor * L / original_max_len - (factor - 1)) ** (H / (H - 2))``. It is a function
  of the positions of each call, so a KV cache keeps the keys rotated with the frequencies of
  the step that wrote them (as ``transformers`` does when lengths only grow, e.g. generation).
* ``llama3``: wavelengths longer than ``original_max_len / low_freq_factor`` are divided by
  ``factor``, shorter than ``original_max_len / high_freq_factor`` kept, the band between
  interpolated smoothly.
* ``yarn`` (Peng et al., 2023): a linear ramp over the pair index between the dimensions that
  rotate ``beta_fast`` and ``beta_slow`` times within ``original_max_len`` blends kept and
  ``factor``-divided frequencies; cos/sin are multiplied by ``attention_factor``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tx.registry import Registry



@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One RoPE scaling variant; fields a kind does not use keep their defaults."""

    kind: str
    factor: float
    original_max_len: int = 2048  # pre-training context (dynamic: where scaling starts)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions
    attention_factor: float = 1.0  # yarn: multiplies cos and sin (so logits by its square)

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise ValueError(f"RopeScaling.kind={self.kind!r}: use one of {SCALINGS.names()}.")
        if not self.factor >= 1.0:
            raise ValueError(f"RopeScaling.factor={self.factor!r}: must be >= 1 (it stretches "
                             "the context).")
        if self.original_max_len < 1:
            raise ValueError(f"RopeScaling.original_max_len={self.original_max_len!r}: must be "
                             "a positive integer.")
        if self.kind in _BANDED and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor={self.high_freq_factor!r} must "
                             f"exceed low_freq_factor={self.low_freq_factor!r}.")

    @property
    def dynamic(self) -> bool:
        """Whether the frequencies depend on the positions of each call."""
        return SCALINGS[self.kind] is DYNAMIC


def default_inv_freq(head_dim: int, base: float) -> np.ndarray:
    """``base^(-2i/H)`` for the ``H/2`` pairs, float32."""
    half = head_dim // 2
    return (base ** (-np.arange(half, dtype=np.float32) / half)).astype(np.float32)


def _linear(head_dim: int, base: float, s: RopeScaling) -> np.ndarray:
    return default_inv_freq(head_dim, base) / s.factor


def _llama3(head_dim: int, base: float, s: RopeScaling) -> np.ndarray:
    inv_freq = default_inv_freq(head_dim, base)
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = s.original_max_len / s.low_freq_factor  # longer: interpolate fully
    short_wavelen = s.original_max_len / s.high_freq_factor  # shorter: keep
    scaled = np.where(wavelen > long_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return np.where(medium, blended, scaled)


def _yarn(head_dim: int, base: float, s: RopeScaling) -> np.ndarray:
    def dim_of(rotations):  # the pair dimension that turns `rotations` times in the context
        return head_dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (
            2 * math.log(base))
    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low frequencies)
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def static_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` (float32) of every kind except ``dynamic``."""
    if scaling is None or scaling.dynamic:
        return default_inv_freq(head_dim, base)
    return SCALINGS[scaling.kind](head_dim, base, scaling).astype(np.float32)


def dynamic_inv_freq(head_dim: int, base: float, scaling: RopeScaling,
                     positions_bt: jax.Array) -> jax.Array:
    """Dynamic NTK inverse frequencies ``[H/2]`` for the length the positions reach."""
    original = scaling.original_max_len
    length = jnp.maximum(jnp.max(positions_bt) + 1, original).astype(jnp.float32)
    growth = (scaling.factor * length / original - (scaling.factor - 1)) ** (
        head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    scaled = 1.0 / (base * growth) ** exponents
    # Within the original context the frequencies are exactly the unscaled ones.
    return jnp.where(length > original, scaled, jnp.asarray(default_inv_freq(head_dim, base)))


# Each kind's static frequencies (DYNAMIC: computed per call from the positions); a research
# file adds a kind with SCALINGS.register(name, fn(head_dim, base, scaling) -> inv_freq).
DYNAMIC = "computed per call"
SCALINGS = Registry("RoPE scaling", "RopeScaling.kind")
for _kind, _fn in (("linear", _linear), ("dynamic", DYNAMIC), ("llama3", _llama3),
                   ("yarn", _yarn)):
    SCALINGS.register(_kind, _fn)
_BANDED = ("llama3",)  # kinds with a low/high frequency band
KINDS = SCALINGS.names()
