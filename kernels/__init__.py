"""tx's attention kernels, their ``jnp`` references and the mask algebra.

Imports nothing from ``tx``: kernels know nothing about models.
"""

from tx.kernels import masks, reference
# The op is exported under its module's name, as the kernels issue asks:
# ``kernels.flash_attention(q, k, v, ...)``; the module stays importable by its full path.
from tx.kernels.flash_attention import flash_attention
from tx.kernels.paged_attention import paged_attention
from tx.kernels.linear_attention import linear_attention
from tx.kernels.masks import (EMPTY, FULL, PARTIAL, And, BigBird, Causal, Full, GlobalTokens,
                           Local, Mask, Or, Strided)

__all__ = ["masks", "reference", "flash_attention", "paged_attention", "linear_attention", "Mask", "Full", "Causal", "Local", "Strided", "BigBird",
           "GlobalTokens", "And", "Or", "EMPTY", "PARTIAL", "FULL"]
