"""Byte-level text corpora that need no download, and LM / MLM / packed datasets over them.

* :func:`stdlib_corpus`: the Python standard library's own source files (present wherever Python
  is), in sorted path order, capped at ``max_bytes``. Different Python versions give slightly
  different text; the file list and sampling are deterministic for a given installation.
* :func:`corpus_from_paths`: any files or directories the user names (directories are walked
  recursively in sorted order; files containing NUL bytes are taken as binary and skipped).

Train/eval are split by document: a document is in eval when the CRC32 of its name falls in the
``eval_fraction`` bucket, so the split is stable when files are added or the size cap changes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sysconfig
import zlib
from typing import Iterable

import numpy as np

from tx.data.common import check_int, check_split, step_rng
from tx.data.masking import bert_corrupt
from tx.data.packing import STRATEGIES, pack
from tx.data.vocab import BYTE_VOCAB_SIZE, EOS, OFFSET

DEFAULT_MAX_BYTES = 4 << 20
DEFAULT_EVAL_FRACTION = 1 / 16
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                "__pycache__", "turtledemo", "ensurepip", "encodings"}


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Documents as one uint8 buffer: document ``i`` is ``data[offsets[i]:offsets[i + 1]]``."""

    data: np.ndarray
    offsets: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_bytes(self) -> int:
        return int(self.offsets[-1])

    def document(self, i: int) -> np.ndarray:
        """Token ids (``OFFSET + byte``, int32) of document ``i``."""
        return self.data[self.offsets[i]:self.offsets[i + 1]].astype(np.int32) + OFFSET

    def text(self, i: int) -> str:
        """Document ``i`` as text (invalid UTF-8 decodes with U+FFFD), for a tokenizer."""
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8",
                                                                          errors="replace")

    def split(self, split: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> "Corpus":
        """The train or eval documents (disjoint; chosen by a hash of each name)."""
        check_split(split)
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
        is_eval = [zlib.crc32(n.encode()) % 10_000 < eval_fraction * 10_000 for n in self.names]
        keep = [i for i, e in enumerate(is_eval) if e == (split == "eval")]
        if not keep:
            raise ValueError(f"the corpus of {len(self)} documents has no {split!r} documents at "
                             f"eval_fraction={eval_fraction}; add more files")
        return _from_chunks([self.data[self.offsets[i]:self.offsets[i + 1]] for i in keep],
                            [self.names[i] for i in keep])

    @functools.cached_property
    def stream(self) -> np.ndarray:
        """All documents as token ids, each followed by EOS (uint16, convert per window)."""
        out = np.full(self.num_bytes + len(self), EOS, np.uint16)
        ends = self.offsets[1:] + np.arange(1, len(self) + 1)  # index of each EOS, exclusive
        mask = np.ones(len(out), bool)
        mask[ends - 1] = False
        out[mask] = self.data.astype(np.uint16) + OFFSET
        return out


def _from_chunks(chunks: list, names: list[str]) -> Corpus:
    sizes = np.array([len(c) for c in chunks], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = np.frombuffer(b"".join(bytes(c) for c in chunks), np.uint8) if chunks else \
        np.zeros(0, np.uint8)
    return Corpus(data=data, offsets=offsets, names=tuple(names))


def _walk(root: str, suffixes, skip_dirs) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames
                  if suffixes is None or f.endswith(tuple(suffixes))]
    return sorted(found)


def _read(files: list[tuple[str, str]], max_bytes: int | None) -> Corpus:
    chunks, names, total = [], [], 0
    for path, name in files:
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            continue  # unreadable entries (broken links, permissions) are not text we can use
        if not blob or b"\0" in blob:
            continue
        if max_bytes is not None and total + len(blob) > max_bytes:
            blob = blob[:max_bytes - total]
            if not blob:
                break
        chunks.append(blob)
        names.append(name)
        total += len(blob)
    return _from_chunks(chunks, names)


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """The standard library's ``.py`` files (tests and vendored packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = [(p, os.path.relpath(p, root)) for p in _walk(root, (".py",), _STDLIB_SKIP)]
    corpus = _read(files, max_bytes)
    if not len(corpus):
        raise ValueError(f"no Python source files found under the stdlib path {root!r}")
    return corpus


def corpus_from_paths(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                      suffixes: Iterable[str] | None = None,
                      max_bytes: int | None = None) -> Corpus:
    """Files and (recursively) directories as documents, named by path, in the order given."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            files += [(f, f) for f in _walk(p, suffixes, {"__pycache__"})]
        elif os.path.isfile(p):
            files.append((p, p))
        else:
            raise ValueError(f"path {p!r} is neither a file nor a directory")
    corpus = _read(files, max_bytes)
    if not len(corpus):
        raise ValueError(f"no non-empty text files found in {list(map(os.fspath, paths))}")
    return corpus


def _window_starts(rng, corpus: Corpus, batch_size: int, width: int) -> np.ndarray:
    if len(corpus.stream) < width:
        raise ValueError(f"corpus of {len(corpus.stream)} tokens is shorter than one window "
                         f"of {width}; lower seq_len or add text")
    return rng.integers(0, len(corpus.stream) - width + 1, batch_size)


class ByteLM:
    """Causal LM on random windows of the corpus stream (documents joined by EOS).

    ``batch(step)`` -> ``inputs``, ``targets`` (inputs shifted by one), ``weights`` (all 1).
    ``contiguous=True``: row ``b`` of step ``t + 1`` continues row ``b`` of step ``t``
    (Transformer-XL's memory needs this): the stream is cut into ``batch_size`` lanes, each
    read ``seq_len`` tokens per step from its start, back to the start at the lane's end;
    ``seed`` shuffles which lane feeds which row.
    """

    task = "lm"
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, corpus: Corpus, *, batch_size: int, seq_len: int, seed: int = 0,
                 contiguous: bool = False):
        self.corpus = corpus
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.contiguous = bool(contiguous)
        _window_starts(step_rng(0, 0), corpus, 1, seq_len + 1)  # fail early if too short
        if self.contiguous and self._windows_per_lane() < 1:
            raise ValueError(f"contiguous=True: {batch_size} lanes of a {len(corpus.stream)}-"
                             f"token stream are shorter than one window of {seq_len + 1}; "
                             "lower batch_size or seq_len, or add text.")

    def _windows_per_lane(self) -> int:
        return (len(self.corpus.stream) // self.batch_size - 1) // self.seq_len

    def _lane_starts(self, step: int) -> np.ndarray:
        lane = len(self.corpus.stream) // self.batch_size
        order = step_rng(self.seed, 0).permutation(self.batch_size)
        return order * lane + (step % self._windows_per_lane()) * self.seq_len

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = step_rng(self.seed, check_int("step", step, 0))
        starts = self._lane_starts(step) if self.contiguous else \
            _window_starts(rng, self.corpus, self.batch_size, self.seq_len + 1)
        window = self.corpus.stream[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:],
                "weights": np.ones((self.batch_size, self.seq_len), np.float32)}


class ByteMLM:
    """Masked LM on random windows with BERT corruption (see ``masking``); EOS is never masked.

    ``batch(step)`` -> ``inputs`` (corrupted), ``targets``, ``weights`` (selected positions),
    ``lengths`` (all ``seq_len``: windows have no padding).
    """

    task = "mlm"
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, corpus: Corpus, *, batch_size: int, seq_len: int, seed: int = 0,
                 rate: float = 0.15):
        self.corpus = corpus
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.rate = rate
        _window_starts(step_rng(0, 0), corpus, 1, seq_len)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = step_rng(self.seed, check_int("step", step, 0))
        starts = _window_starts(rng, self.corpus, self.batch_size, self.seq_len)
        tokens = self.corpus.stream[starts[:, None] + np.arange(self.seq_len)].astype(np.int32)
        out = bert_corrupt(rng, tokens, tokens >= OFFSET, random_low=OFFSET,
                           random_high=BYTE_VOCAB_SIZE, rate=self.rate)
        out["lengths"] = np.full(self.batch_size, self.seq_len, np.int32)
        return out


class PackedBytes:
    """Causal LM on short documents (random spans of random corpus files) packed into rows.

    Each step draws spans of ``min_doc_len..max_doc_len`` bytes until they cover the batch, then
    :func:`~tx.data.packing.pack` s them (``segment_ids``/``positions`` included).
    """

    task = "lm"
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, corpus: Corpus, *, batch_size: int, seq_len: int, seed: int = 0,
                 min_doc_len: int = 8, max_doc_len: int | None = None,
                 strategy: str = "first_fit"):
        self.corpus = corpus
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.min_doc_len = check_int("min_doc_len", min_doc_len, 1)
        self.max_doc_len = check_int("max_doc_len", seq_len if max_doc_len is None
                                     else max_doc_len, self.min_doc_len)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
        self.strategy = strategy

    def documents(self, step: int) -> list[np.ndarray]:
        """The documents packed into ``batch(step)`` (some may not fit and be dropped)."""
        rng = step_rng(self.seed, check_int("step", step, 0))
        sizes = np.diff(self.corpus.offsets)
        docs, total = [], 0
        while total < self.batch_size * self.seq_len:
            i = int(rng.integers(len(self.corpus)))
            length = int(min(rng.integers(self.min_doc_len, self.max_doc_len + 1), sizes[i]))
            start = int(rng.integers(0, sizes[i] - length + 1))
            at = int(self.corpus.offsets[i]) + start
            docs.append(self.corpus.data[at:at + length].astype(np.int32) + OFFSET)
            total += length + 1
        return docs

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return pack(self.documents(step), self.seq_len, num_rows=self.batch_size,
                    strategy=self.strategy)


class TextFiles:
    """Causal LM over whole documents (one per file), tokenised and packed with segment ids.

    Each document is ``tokenizer.document(text)`` (BOS + its ids; the byte vocabulary when no
    tokenizer is given). An epoch is every document once, in an order shuffled per epoch, packed
    ``sequential`` ly (densest: a long document continues in the next row, and the row count is
    the same whatever the order); ``batch(step)`` is rows ``step * B .. step * B + B - 1`` of
    the endless run of epochs, so it is a pure function of the step. A document's last token
    targets the tokenizer's EOS (weight 0 when it has none).
    """

    task = "lm"

    def __init__(self, corpus: Corpus, *, tokenizer=None, batch_size: int, seq_len: int,
                 seed: int = 0):
        from tx.data.tokenizer import ByteTokenizer
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.docs = self.tokenizer.documents([corpus.text(i) for i in range(len(corpus))])
        self.num_tokens = sum(len(d) for d in self.docs)
        if not self.num_tokens:
            raise ValueError(f"the {len(corpus)} documents tokenise to no tokens; add text.")
        self.rows_per_epoch = -(-self.num_tokens // self.seq_len)
        self._epochs: dict[int, dict[str, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # steps move forward: older epochs are done
                self._epochs.pop(min(self._epochs))
            order = step_rng(self.seed, epoch, 0x7E47).permutation(len(self.docs))
            self._epochs[epoch] = pack([self.docs[i] for i in order], self.seq_len,
                                       strategy="sequential", eos_id=self.tokenizer.eos_id)
        return self._epochs[epoch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        first = check_int("step", step, 0) * self.batch_size
        rows = [divmod(g, self.rows_per_epoch) for g in range(first, first + self.batch_size)]
        epochs = {e: self._epoch(e) for e in sorted({e for e, _ in rows})}
        return {key: np.stack([epochs[e][key][r] for e, r in rows]) for key in epochs[rows[0][0]]}
