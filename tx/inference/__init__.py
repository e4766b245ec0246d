"""Inference: generation (greedy, sampling, beam search) over KV caches."""

from tx.inference.beam import beam_search
from tx.inference.generation import Contiguous, Generation, Paged, Recompute, generate
from tx.inference.memory import kv_cache_bytes
from tx.inference.paged_cache import OutOfPages, PagePool, copy_pages, write_kv
from tx.inference.sampling import Greedy, Sample, filter_logits

__all__ = ["generate", "beam_search", "Generation", "Contiguous", "Paged", "Recompute",
           "Greedy", "Sample", "filter_logits",
           "PagePool", "OutOfPages", "copy_pages", "write_kv", "kv_cache_bytes"]
