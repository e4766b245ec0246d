"""FNet token mixing (Lee-Thorp et al., 2021, arXiv:2105.03824): attention replaced by the real
part of a 2-D discrete Fourier transform over the sequence and hidden axes,

    y = Re(DFT_T(DFT_D(x))) = real(fft2(x)) over (T, D),

with no parameters. Every position mixes with every other, so the layer is bidirectional only:
a decoder (causal) schedule refuses it by name. Padding is handled as FNet (and Hugging Face's
``FNetModel``, which takes no attention mask) handles it: padded positions are part of the
transform; the valid rows' outputs depend on the padding, as in the reference. Packed rows
(``segment_ids``) would mix documents, so they are refused.

In a schedule it is one more layer value: ``layer_pattern=fnet,fnet,full``. The block around it
is the model's own (residual and norms), which is FNet's ``LayerNorm(x + fourier(x))`` for a
post-norm model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tx.kernels import masks as masks_lib
from tx.attention import patterns


def fourier_mix(x_btd: jax.Array) -> jax.Array:
    """``real(fft2(x))`` over ``(T, D)`` in fp32, returned in ``x``'s dtype."""
    out = jnp.fft.fft2(x_btd.astype(jnp.float32), axes=(-2, -1)).real
    return out.astype(x_btd.dtype)


def _refuse_causal(where: str) -> None:
    raise ValueError(f"{where}: an FNet layer ('fnet', tx.attention.fnet.FNet) mixes every "
                     "position with every other and is not causal; use it in an encoder "
                     "(task=mlm, seq_cls, token_cls), not in a decoder.")


@dataclasses.dataclass(frozen=True)
class FNet:
    """An FNet token-mixing layer in the per-layer schedule (``attention.masks``)."""

    @property
    def mask(self) -> masks_lib.Mask:
        """Every position sees every other (for tools that draw the schedule)."""
        return masks_lib.Full()

    def build_attention(self, cfg, *, layer: int, positions=None, rngs: nnx.Rngs):
        if getattr(cfg.head, "causal", False):
            _refuse_causal(f"attention.masks[{layer}]=FNet() with head="
                           f"{type(cfg.head).__name__}")
        return FourierMixing(dtype=cfg.dtype)

    def state_bytes(self, cfg, batch: int, tokens: int = 0) -> int:
        return 0  # no decoding state: an encoder layer


class FourierMixing(nnx.Module):
    """``x [B, T, D] -> real(fft2(x))``: the self-attention slot of a block, no parameters."""

    pageable = False

    def __init__(self, *, dtype=jnp.float32):
        self.dtype = dtype
        self.cache = None
        self.mask = masks_lib.Full()

    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        _refuse_causal("init_cache (decoding)")

    def __call__(self, x_btd: jax.Array, positions_bt=None, *, context_bsd=None,
                 segment_ids=None, kv_lengths=None) -> jax.Array:
        """``kv_lengths`` (padding) is ignored, as FNet ignores it; ``positions_bt`` too (the
        transform sees the order itself)."""
        if context_bsd is not None:
            raise ValueError("an FNet layer mixes its own sequence; cross-attention stays "
                             "softmax.")
        if segment_ids is not None:
            raise ValueError("segment_ids (packed rows) given to an FNet layer: its Fourier "
                             "transform mixes every position of a row, so packed documents "
                             "would see each other; turn packing off for FNet schedules.")
        return fourier_mix(x_btd.astype(self.dtype))


def _fnet(f, *, causal: bool) -> FNet:
    if causal:
        _refuse_causal("layer_pattern/attention='fnet' in a causal schedule")
    return FNet()


# -- flag name: 'fnet' in attention / layer_pattern (no fields of its own) ----------------------
patterns.PATTERNS.register("fnet", _fnet,
                           prints=lambda v, causal: (type(v) is FNet and not causal) and {})
