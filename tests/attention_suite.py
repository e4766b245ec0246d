"""The attention conformance suite moved to ``tx.testing`` (importable by research code): one
suite for every path a backend offers (dense, cached, paged, paged_write, linear), run here
by ``tests/kernels/test_conformance.py``. These names are kept for old imports."""

from tx.testing import (CASES, CATALOGUE, TOLERANCE, BackendSuite, DenseCase,  # noqa: F401
                        assert_close)

AttentionSuite = BackendSuite
Case = DenseCase
MASKS = list(CATALOGUE)
