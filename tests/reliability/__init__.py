"""The reliability suite: what tx survives and which bad input it refuses, one test per
guarantee (README, "Guarantees").

Here: preemption (SIGTERM once, twice, on one host of two), SIGKILL and torn saves, corrupt and
truncated checkpoints, a full disk, workdir locking, the non-finite guard and learning-rate
bounds, checksums, extended schedules, and bad prompt ids, block tables and HF checkpoints.

Guarantees that held before this suite existed keep their tests beside the code they cover:
config and mesh errors naming the field (tests/test_experiments.py, tests/tx/test_train_configs.py,
tests/tx/test_parallel.py), fully masked rows giving zeros (tests/attention_suite.py), checkpoint
retention and best-N (tests/tx/test_train_loop.py), in-process resume and determinism
(tests/tx/test_train_loop.py, tests/test_multihost.py).
"""
