"""tx: a JAX/Flax research framework for transformer architecture work.

The registries research code extends from its own files are reachable here
(``tx.register_pattern``, ``tx.register_positions``, ``tx.register_head``,
``tx.register_attention``); they load on first use, so ``import tx.config`` stays light.

Importing tx first keeps XLA's CPU scratch memory mapped between executions
(``tx.host_memory``; ``TX_HOST_MALLOC=system`` leaves malloc alone).
"""
from tx import host_memory as _host_memory

_host_memory.keep_freed_memory()

_LAZY = {"register_pattern": ("tx.flags", "register_pattern"),
         "register_positions": ("tx.flags", "register_positions"),
         "register_head": ("tx.flags", "register_head"),
         "register_attention": ("tx.attention.registry", "register"),
         "register_dataset": ("tx.data", "register_dataset")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tx' has no attribute {name!r}")
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
