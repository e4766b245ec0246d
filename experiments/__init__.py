"""Thin absl scripts over tx: flags, then one tx call. Run them as files
(``python experiments/train.py ...``) or, once installed, as ``tx-train``, ``tx-ablate``,
``tx-evaluate`` and ``tx-generate``.

Importing this package (every script does) keeps freed host memory for XLA's next execution
(``tx.host_memory``), before JAX runs anything: a library must not change the process, a
program may. ``TX_HOST_MALLOC=system`` leaves malloc alone."""

from tx import host_memory

host_memory.keep_freed_memory()
