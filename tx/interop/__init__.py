"""Interop with other frameworks' checkpoints (Hugging Face ``transformers``) and the
attention swaps that make a loaded model an ablation subject."""

from tx.interop import hf
from tx.interop.swap import pool_kv_heads, set_masks

__all__ = ["hf", "pool_kv_heads", "set_masks"]
