"""Makes ``tx.kernels``, ``tx.experiments`` and ``tx.configs`` importable from a bare checkout.

An installed tx (``pip install -e .``) maps these names to the top-level folders ``kernels/``,
``experiments/`` and ``configs/`` (pyproject's ``package-dir``). The GPU machine runs the
checkout without installing it (no package index there, and nothing needs building), so the
GPU run puts the repository root on ``PYTHONPATH`` and imports this module first (the
benchmark sections import it; pytest loads it with ``-p tx_paths``). Its finder is the last
one tried: where an installed tx already resolves a name, that wins, and nothing changes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "experiments", "configs")


class _TxFolders:
    """``tx.<folder>`` -> ``<root>/<folder>/__init__.py`` for the folders above."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != "tx" or name not in FOLDERS or "." in name:
            return None
        init = ROOT / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(ROOT / name)])


def install() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if not any(isinstance(f, _TxFolders) for f in sys.meta_path):
        sys.meta_path.append(_TxFolders())


install()
