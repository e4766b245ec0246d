"""Real data through grain: ArrayRecord files and Hugging Face ``datasets``, packed LM rows.

For researchers with their own corpora. Both sources are random access, so they go through a
``grain.MapDataset``: a seeded global shuffle that draws a fresh permutation every epoch, then a
per-document map to token ids. ``batch(step)`` reads documents ``step * n .. step * n + n - 1`` of
that endless shuffled stream (``n = batch_size * docs_per_row``) and packs them into rows with
segment ids (:func:`~tx.data.packing.pack`), so the batch is a pure function of the step: the
data position of a run is its step, saved and restored with its checkpoints like every other
tx dataset. A piece of a document that does not fit its rows is dropped.

Documents become token ids in one of two ways (``record_format``):
  * ``"bytes"``: the record (or text column) is UTF-8 text: byte-level ids, as the built-in
    corpora use (``vocab_size`` is the byte vocabulary), or, with ``tokenizer`` (a
    ``tokenizer.json`` or its directory, e.g. a pretrained checkpoint's), that tokenizer's
    BOS + ids, the last token targeting its EOS (``vocab_size`` is the tokenizer's);
  * ``"int32"``: the record holds little-endian int32 token ids (or the column holds lists of
    ints), from the user's own tokenizer; pass its ``vocab_size``.

grain, array_record and ``datasets`` are the ``data`` extra (``pip install -e '.[data]'``); this
module imports them only when such a dataset is built.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Sequence

import numpy as np

from tx.data.common import check_int, check_split
from tx.data.packing import STRATEGIES, pack
from tx.data.tokenizer import make_tokenizer
from tx.data.vocab import BYTE_VOCAB_SIZE, EOS, OFFSET

RECORD_FORMATS = ("bytes", "int32")


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"this dataset needs the {module.split('.')[0]!r} package; install "
                          "the data extra: pip install -e '.[data]'") from None


def _to_ids(record_format: str, vocab_size: int) -> Callable[[Any], np.ndarray]:
    """A record (bytes, str or a list of ints) -> int32 token ids."""
    def ids(record) -> np.ndarray:
        if isinstance(record, str):
            record = record.encode("utf-8")
        if record_format == "bytes":
            return np.frombuffer(bytes(record), np.uint8).astype(np.int32) + OFFSET
        if isinstance(record, (bytes, bytearray, memoryview)):
            tokens = np.frombuffer(bytes(record), "<i4").astype(np.int32)
        else:
            tokens = np.asarray(record, np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"a record holds token ids in [{tokens.min()}, {tokens.max()}], "
                             f"outside vocab_size={vocab_size}; pass the tokenizer's size.")
        return tokens
    return ids


def _vocab(record_format: str, vocab_size: int | None) -> int:
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record_format={record_format!r} must be one of {RECORD_FORMATS}.")
    if record_format == "bytes":
        return BYTE_VOCAB_SIZE
    if vocab_size is None:
        raise ValueError("record_format='int32' needs vocab_size=<your tokenizer's size>.")
    return check_int("vocab_size", vocab_size, 1)


class GrainLM:
    """Causal LM rows packed from a random-access source of documents (see the module doc).

    Args:
      source: anything with ``__len__`` and ``__getitem__`` returning a document record.
      batch_size, seq_len, seed: as every tx dataset.
      record_format: ``"bytes"`` or ``"int32"`` (see the module doc).
      vocab_size: the tokenizer's size for ``"int32"`` records.
      docs_per_row: documents drawn per row (more packs denser, and drops more of long ones).
      strategy: a :data:`~tx.data.packing.STRATEGIES` packing strategy.
      tokenizer: for text records, a ``tokenizer.json`` (or its directory, or a loaded
        tokenizer) to tokenise them with instead of bytes.
    """

    task = "lm"

    def __init__(self, source, *, batch_size: int, seq_len: int, seed: int = 0,
                 record_format: str = "bytes", vocab_size: int | None = None,
                 docs_per_row: int = 1, strategy: str = "first_fit", tokenizer=None):
        grain = _require("grain")
        if tokenizer is None:
            self.vocab_size = _vocab(record_format, vocab_size)
            to_ids, self.eos_id = _to_ids(record_format, self.vocab_size), EOS
        else:
            to_ids = self._tokenised(tokenizer, record_format, vocab_size)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.docs_per_row = check_int("docs_per_row", docs_per_row, 1)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}.")
        if len(source) == 0:
            raise ValueError("the source holds no documents; check its paths or split.")
        self.strategy = strategy
        self.num_documents = len(source)
        self._docs = (grain.MapDataset.source(source)
                      .shuffle(seed=check_int("seed", seed, 0))  # a new permutation per epoch
                      .map(to_ids))

    def _tokenised(self, tokenizer, record_format: str, vocab_size) -> Callable:
        """Sets ``vocab_size`` / ``eos_id`` from ``tokenizer``; text record -> its ids."""
        if record_format not in RECORD_FORMATS:
            raise ValueError(f"record_format={record_format!r} must be one of "
                             f"{RECORD_FORMATS}.")
        if record_format != "bytes":
            raise ValueError(f"tokenizer={tokenizer!r} tokenises text records, but "
                             f"record_format={record_format!r} records are token ids already; "
                             "drop one of the two options.")
        tok = make_tokenizer(tokenizer)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} but the tokenizer {tok.name!r} has "
                             f"{tok.vocab_size} tokens; drop vocab_size (the tokenizer sets it).")
        self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id

        def ids(record) -> np.ndarray:
            if not isinstance(record, str):
                record = bytes(record).decode("utf-8", errors="replace")
            return tok.document(record)
        return ids

    def documents(self, step: int) -> list[np.ndarray]:
        n = self.batch_size * self.docs_per_row
        start = check_int("step", step, 0) * n
        return [self._docs[i] for i in range(start, start + n)]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return pack(self.documents(step), self.seq_len, num_rows=self.batch_size,
                    strategy=self.strategy, eos_id=self.eos_id)


def _paths(paths: str | Sequence[str], what: str) -> list[str]:
    """Comma-separated or listed paths and glob patterns -> sorted existing files."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    found = sorted({f for p in paths for f in (glob.glob(p) or [p])})
    missing = [f for f in found if not os.path.isfile(f)]
    if not found or missing:
        raise ValueError(f"{what}={list(paths)!r}: no such file(s) {missing or found}; pass "
                         "ArrayRecord files or glob patterns, comma-separated.")
    return found


def array_record_lm(*, batch_size: int, seq_len: int, seed: int, split: str,
                    paths: str | Sequence[str] | None = None,
                    eval_paths: str | Sequence[str] | None = None, **options) -> GrainLM:
    """LM over ArrayRecord files (``paths`` for train, ``eval_paths`` for eval)."""
    sources = _require("grain.sources")
    check_split(split)
    if not paths:
        raise ValueError("the array_record dataset needs paths=<ArrayRecord files or globs> "
                         "(--config.data.options.paths=...).")
    if split == "eval" and not eval_paths:
        raise ValueError("split='eval' needs eval_paths=<ArrayRecord files held out from "
                         "training>.")
    files = _paths(paths if split == "train" else eval_paths,
                   "paths" if split == "train" else "eval_paths")
    return GrainLM(sources.ArrayRecordDataSource(files), batch_size=batch_size,
                   seq_len=seq_len, seed=seed, **options)


class _Column:
    """One column of a Hugging Face ``Dataset``, as a random-access source."""

    def __init__(self, dataset, column: str):
        if column not in dataset.column_names:
            raise ValueError(f"column={column!r} is not in the dataset; it has "
                             f"{dataset.column_names}.")
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[int(i)][self.column]


def hf_lm(*, batch_size: int, seq_len: int, seed: int, split: str, path: str | None = None,
          train_split: str = "train", eval_split: str = "validation", column: str = "text",
          **options) -> GrainLM:
    """LM over a local Hugging Face dataset: a ``save_to_disk`` directory or anything
    ``datasets.load_dataset(path)`` reads offline (a directory of json/csv/parquet/text files)."""
    datasets = _require("datasets")
    check_split(split)
    if not path:
        raise ValueError("the hf dataset needs path=<a local dataset directory> "
                         "(--config.data.options.path=...).")
    name = train_split if split == "train" else eval_split
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or \
            os.path.isfile(os.path.join(path, "dataset_info.json")):
        loaded = datasets.load_from_disk(path)
    else:
        loaded = datasets.load_dataset(path)
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            raise ValueError(f"{'train' if split == 'train' else 'eval'}_split={name!r} is "
                             f"not in {path!r}; it has {list(loaded)}.")
        loaded = loaded[name]
    elif split == "eval":
        raise ValueError(f"{path!r} holds one split; point eval at another dataset or save a "
                         "DatasetDict with an eval split.")
    return GrainLM(_Column(loaded, column), batch_size=batch_size, seq_len=seq_len, seed=seed,
                   **options)
