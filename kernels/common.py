"""Small helpers every kernel module here shares: power-of-two arithmetic for tile shapes, the
dtypes the kernels accept, and the Triton launch parameters.

Imports nothing from ``kernels``, so any module of the package can use it.
"""

from __future__ import annotations

import dataclasses

from typing import Any

import jax.numpy as jnp
import numpy as np

try:  # Triton launch parameters; absent on JAX builds without the Triton backend.
    from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover
    _pl_triton = None

# The dtypes of q, k and v the Pallas kernels take (they accumulate in fp32 either way).
SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in ("float32", "bfloat16", "float16"))


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``): Triton tiles are powers of two."""
    return 1 << max(0, int(x) - 1).bit_length()


def round_up(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m``."""
    return -(-x // m) * m


def is_int(x: Any) -> bool:
    """A Python or numpy integer, but not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Triton launch parameters of a kernel without block-size options (the linear and
    recurrent kernels): what :func:`compiler_params` reads."""

    num_warps: int | None = 4
    num_stages: int = 2


DEFAULT_LAUNCH = Launch()


def compiler_params(interpret: bool, launch: Any):
    """Triton launch parameters for ``pl.pallas_call``, taken from ``launch.num_warps`` and
    ``launch.num_stages`` (a ``BlockSizes``, ``PagedBlockSizes`` or a config copying them);
    ``None`` in interpret mode or when this JAX has no Triton backend."""
    if _pl_triton is None or interpret:
        return None
    return _pl_triton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)
