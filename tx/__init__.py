"""tx: a JAX/Flax research framework for transformer architecture work.

The registries research code extends from its own files are reachable here
(``tx.register_pattern``, ``tx.register_positions``, ``tx.register_head``,
``tx.register_attention``); they load on first use, so ``import tx.config`` stays light.

Importing tx changes nothing process-wide. On a CPU, a script of yours that trains a large
model may call ``tx.host_memory.keep_freed_memory`` first thing, before JAX runs anything,
as tx's own scripts do (``experiments/``): XLA's CPU scratch memory then stays mapped between
steps (see the README's "Host memory" note; ``GLIBC_TUNABLES`` does the same from outside).
"""

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
