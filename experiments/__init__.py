"""Thin absl scripts over tx: flags, then one tx call. Run them as files
(``python experiments/train.py ...``) or, once installed, as ``tx-train``, ``tx-ablate``,
``tx-evaluate`` and ``tx-generate``."""
