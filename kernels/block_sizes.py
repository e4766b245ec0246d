"""Tile sizes for the flash attention kernels: one frozen dataclass and one tuning table.

This is the only place block-size literals live. ``block_q`` counts query *positions*; a
program folds the ``G`` query heads of a GQA group into its tile, so its q tile has
``block_q * fold`` rows. The table therefore keys on the fold as well as on the device kind
and the (padded) head dim, and shrinks ``block_q`` as the fold grows to keep rows bounded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from tx.kernels.common import is_int, next_pow2

MIN_BLOCK = 16     # Triton's dot needs >= 16 along every dimension
MAX_BLOCK = 512    # beyond this a tile no longer fits in registers/shared memory
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the forward kernel, the dq kernel and the dk/dv kernel.

    ``block_q*`` are query positions per tile, ``block_k*`` key positions per tile.
    ``num_warps`` / ``num_stages`` are Triton launch parameters (ignored in interpret mode).
    """

    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps: int | None = None
    num_stages: int = 2

    def fields(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith("block_")}


# (device family, padded head dim) -> block sizes at fold 1 (MHA). Measured starting points
# from FlashAttention-2/JAX Pallas defaults; re-tune per device with experiments/bench_attention.
_TABLE: dict[tuple[str, int], BlockSizes] = {
    ("cpu", 64): BlockSizes(64, 64, 64, 64, 64, 64),
    ("cpu", 128): BlockSizes(64, 64, 64, 64, 64, 64),
    ("cpu", 256): BlockSizes(32, 32, 32, 32, 32, 32),
    ("gpu", 64): BlockSizes(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3),
    ("gpu", 128): BlockSizes(128, 64, 64, 32, 32, 64, num_warps=8, num_stages=2),
    ("gpu", 256): BlockSizes(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2),
}
# Rows (block_q * fold) a q tile may hold before block_q is halved for GQA folding.
_MAX_ROWS = {"cpu": 256, "gpu": 128}


def device_family(device_kind: str | None = None) -> str:
    """``"gpu"`` for NVIDIA devices, else ``"cpu"`` (interpret mode)."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind if jax.default_backend() == "gpu" else "cpu"
    return "gpu" if "nvidia" in device_kind.lower() or device_kind.lower() == "gpu" else "cpu"


def default_block_sizes(head_dim: int, fold: int = 1,
                        device_kind: str | None = None) -> BlockSizes:
    """The table entry for this device and head dim, with ``block_q`` tiles shrunk so that
    ``block_q * fold`` rows stay within the device's row budget (never below ``MIN_BLOCK``)."""
    family = device_family(device_kind)
    dim_key = next(d for d in (64, 128, 256) if head_dim <= d or d == 256)
    base = _TABLE[(family, dim_key)]
    max_rows = _MAX_ROWS[family]

    def rows(block):
        return max(MIN_BLOCK, min(block, max_rows // fold))

    return dataclasses.replace(base, block_q=rows(base.block_q),
                               block_q_dq=rows(base.block_q_dq),
                               block_q_dkv=rows(base.block_q_dkv))


# --- paged decode (kernels/paged_attention.py) ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    """Tiles of the paged decode kernel.

    ``block_k`` is the key positions a program loads per loop iteration; the kernel reads
    ``pages_per_block = block_k // page_size`` pages at a time (at least one). ``num_warps`` /
    ``num_stages`` are Triton launch parameters (ignored in interpret mode).
    """

    block_k: int
    num_warps: int | None = None
    num_stages: int = 2


# (device family, padded head dim) -> paged decode tiles. Decode is bound by memory reads, so
# the GPU tiles are as wide as the registers allow (JAX's defaults: 8 pages of 16 tokens);
# interpret mode wants few, wide loop iterations.
_PAGED_TABLE: dict[tuple[str, int], PagedBlockSizes] = {
    ("cpu", 64): PagedBlockSizes(128),
    ("cpu", 128): PagedBlockSizes(128),
    ("cpu", 256): PagedBlockSizes(64),
    ("gpu", 64): PagedBlockSizes(128, num_warps=4, num_stages=2),
    ("gpu", 128): PagedBlockSizes(64, num_warps=4, num_stages=2),
    ("gpu", 256): PagedBlockSizes(32, num_warps=8, num_stages=2),
}
# Programs worth launching before split-K stops paying: ~2 per SM on an H100 (132 SMs);
# interpret mode runs programs one after another, so splitting only adds work there.
PAGED_TARGET_PROGRAMS = {"cpu": 1, "gpu": 256}


def default_paged_block_sizes(head_dim: int, device_kind: str | None = None) -> PagedBlockSizes:
    """The paged decode table entry for this device and head dim."""
    family = device_family(device_kind)
    dim_key = next(d for d in (64, 128, 256) if head_dim <= d or d == 256)
    return _PAGED_TABLE[(family, dim_key)]


def default_split_k(programs: int, num_blocks: int, device_kind: str | None = None) -> int:
    """Flash-decoding splits: enough programs (``programs`` = batch x kv heads, each split
    ``split_k`` ways) to fill the device, a power of two unless capped by the compute blocks
    (``num_blocks``) a sequence can have."""
    target = PAGED_TARGET_PROGRAMS[device_family(device_kind)]
    want = -(-target // max(1, programs))
    return max(1, min(next_pow2(want), num_blocks))


def check_block_sizes(block_sizes: Any) -> BlockSizes:
    """Every tile must be a power of two in ``[MIN_BLOCK, MAX_BLOCK]``."""
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes={block_sizes!r} must be a "
                         "kernels.block_sizes.BlockSizes or None (use the tuning table).")
    lo, hi = MIN_BLOCK, MAX_BLOCK
    for name, value in block_sizes.fields().items():
        integer = is_int(value)
        if not integer or not lo <= value <= hi or value & (value - 1):
            fix = min(hi, max(lo, next_pow2(value))) if integer else lo
            raise ValueError(f"block_sizes.{name}={value!r} must be a power of two in "
                             f"[{lo}, {hi}]; use e.g. {name}={fix}.")
    return block_sizes


def effective_blocks(bs: BlockSizes, q_len: int, kv_len: int) -> BlockSizes:
    """Clamp tiles to the (power-of-two-rounded) sequence so short inputs pad little."""
    qmax = max(MIN_BLOCK, next_pow2(q_len))
    kmax = max(MIN_BLOCK, next_pow2(kv_len))
    return dataclasses.replace(
        bs, block_q=min(bs.block_q, qmax), block_q_dq=min(bs.block_q_dq, qmax),
        block_q_dkv=min(bs.block_q_dkv, qmax), block_k=min(bs.block_k, kmax),
        block_k_dq=min(bs.block_k_dq, kmax), block_k_dkv=min(bs.block_k_dkv, kmax))
