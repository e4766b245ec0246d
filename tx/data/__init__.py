"""tx.data: offline, numpy-only, deterministic datasets.

Every dataset has ``task``, ``vocab_size`` and ``batch(step) -> dict[str, np.ndarray]``, a pure
function of its constructor arguments and ``step`` (so the data position of a run is its step;
see :class:`StepIterator`). Batch keys by ``task``:

=============  ===============================================================================
``lm``         ``inputs [B,T]``, ``targets [B,T]`` (next token), ``weights [B,T]`` float32;
               packed rows add ``segment_ids [B,T]`` (1, 2, ... per document, 0 = padding) and
               ``positions [B,T]`` (restarting at 0 per document)
``mlm``        ``inputs`` (corrupted), ``targets`` (original), ``weights`` (1 at corrupted
               positions only), ``lengths [B]``
``seq_cls``    ``inputs [B,T]``, ``labels [B]``, ``lengths [B]``
``token_cls``  ``inputs``, ``targets [B,T]``, ``weights``, ``lengths``
``seq2seq``    ``source [B,S]``, ``source_lengths [B]``, ``inputs [B,T]`` (BOS + target,
               teacher forcing), ``targets [B,T]`` (target + EOS), ``weights [B,T]``
=============  ===============================================================================

Integer arrays are int32, weights float32. :func:`make_dataset` builds one by name.
"""

from __future__ import annotations

import inspect
from typing import Callable

from tx.data.common import check_int, check_split
from tx.data.loader import Dataset, StepIterator
from tx.data.masking import bert_corrupt
from tx.data.packing import pack
from tx.data import records
from tx.data.synthetic import (MQAR, Copy, Duplicates, Majority, MaskedCopy, Reverse, Sort,
                               SyntheticTask)
from tx.data.text import (ByteLM, ByteMLM, Corpus, PackedBytes, TextFiles, corpus_from_paths,
                          stdlib_corpus)
from tx.data.tokenizer import (ByteTokenizer, check_vocab, load_tokenizer, make_tokenizer,
                               model_tokenizer)
from tx.data.vocab import (BOS, BYTE_VOCAB_SIZE, EOS, MASK, OFFSET, PAD, SEP, decode_bytes,
                           encode_bytes)

TASKS = ("lm", "mlm", "seq_cls", "token_cls", "seq2seq")


_COMMON = ("self", "corpus", "batch_size", "seq_len", "seed", "split")
_TEXT_EXTRAS = ("paths", "max_bytes", "eval_fraction")


def _options(cls, extras=()) -> tuple[str, ...]:
    """The keyword arguments a registered dataset takes besides the common ones."""
    names = inspect.signature(cls.__init__).parameters
    return tuple(n for n in names if n not in _COMMON) + tuple(extras)


def _synthetic(cls) -> Callable:
    def build(*, batch_size, seq_len, seed, split, **kwargs):
        return cls(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split, **kwargs)
    build.__doc__ = cls.__doc__
    build.options = _options(cls)
    return build


def _text(cls) -> Callable:
    def build(*, batch_size, seq_len, seed, split, paths=None, max_bytes=None,
              eval_fraction=None, **kwargs):
        if paths is None:
            corpus = stdlib_corpus(*(() if max_bytes is None else (max_bytes,)))
        else:
            corpus = corpus_from_paths(paths, max_bytes=max_bytes)
        split_kwargs = {} if eval_fraction is None else {"eval_fraction": eval_fraction}
        return cls(corpus.split(split, **split_kwargs), batch_size=batch_size, seq_len=seq_len,
                   seed=seed, **kwargs)
    build.__doc__ = cls.__doc__
    build.options = _options(cls, _TEXT_EXTRAS)
    return build


def _path_list(paths) -> list[str]:
    """A flag's comma-separated string, or a list, of paths."""
    return [p for p in paths.split(",") if p] if isinstance(paths, str) else list(paths)


def _text_files(*, batch_size, seq_len, seed, split, paths=None, eval_paths=None,
                tokenizer=None, max_bytes=None, eval_fraction=None) -> TextFiles:
    """Your text files (``paths``: files or directories, comma-separated), one document each,
    tokenised with ``tokenizer`` (a tokenizer.json or its directory; default: bytes) and packed.
    Eval takes ``eval_paths`` when given, else the documents whose name hashes into
    ``eval_fraction`` (see :meth:`Corpus.split`)."""
    if not paths:
        raise ValueError("the text_files dataset needs paths=<text files or directories> "
                         "(--config.data.options.paths=...).")
    if eval_paths:
        corpus = corpus_from_paths(_path_list(paths if split == "train" else eval_paths),
                                   max_bytes=max_bytes)
    else:
        split_kwargs = {} if eval_fraction is None else {"eval_fraction": eval_fraction}
        corpus = corpus_from_paths(_path_list(paths), max_bytes=max_bytes)
        try:
            corpus = corpus.split(split, **split_kwargs)
        except ValueError as e:  # e.g. fine-tuning on one file: nothing to hold out
            raise ValueError(f"{e}, or give the eval split its own files with "
                             "--config.data.options.eval_paths=<files or directories>.") from None
    return TextFiles(corpus, tokenizer=make_tokenizer(tokenizer), batch_size=batch_size,
                     seq_len=seq_len, seed=seed)


_text_files.options = ("paths", "eval_paths", "tokenizer", "max_bytes", "eval_fraction")
_text_files.reads_your_files = True

_GRAIN_OPTIONS = ("record_format", "vocab_size", "docs_per_row", "strategy", "tokenizer")


def _grain(build_fn, *own) -> Callable:
    build_fn.options = tuple(own) + _GRAIN_OPTIONS
    build_fn.reads_your_files = True
    return build_fn


REGISTRY: dict[str, Callable] = {
    "copy": _synthetic(Copy),
    "reverse": _synthetic(Reverse),
    "sort": _synthetic(Sort),
    "mqar": _synthetic(MQAR),
    "classify": _synthetic(Majority),
    "tagging": _synthetic(Duplicates),
    "mlm": _synthetic(MaskedCopy),
    "bytes": _text(ByteLM),
    "bytes_mlm": _text(ByteMLM),
    "packed_bytes": _text(PackedBytes),
    "text_files": _text_files,
    # Real data (the `data` extra): grain over ArrayRecord files or a local HF dataset.
    "array_record": _grain(records.array_record_lm, "paths", "eval_paths"),
    "hf": _grain(records.hf_lm, "path", "train_split", "eval_split", "column"),
}


# Datasets that read the user's files (options paths / path) rather than built-in data.
EXTERNAL = tuple(n for n, b in REGISTRY.items() if getattr(b, "reads_your_files", False))


def register_dataset(name: str, build: Callable, *, options: tuple[str, ...] = ()) -> None:
    """Adds dataset ``name`` for ``config.data.name``: ``build(*, batch_size, seq_len, seed,
    split, **options)`` returns an object with ``task``, ``vocab_size`` and ``batch(step)``."""
    if not isinstance(name, str) or not name or not callable(build):
        raise ValueError(f"register_dataset(name={name!r}, build={build!r}): give a non-empty "
                         "name and a function.")
    build.options = tuple(options)
    REGISTRY[name] = build


def list_datasets(*, built_in: bool = False) -> tuple[str, ...]:
    """Registered dataset names; ``built_in=True``: only those that need no files of yours."""
    return tuple(sorted(n for n in REGISTRY if not (built_in and n in EXTERNAL)))


def make_dataset(name: str, *, batch_size: int, seq_len: int, seed: int = 0,
                 split: str = "train", **kwargs) -> Dataset:
    """Build dataset ``name`` (see :func:`list_datasets`). ``kwargs`` go to the dataset class;
    text datasets also take ``paths`` (files/directories instead of the stdlib corpus),
    ``max_bytes`` and ``eval_fraction``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    check_int("seed", seed, 0)
    check_split(split)
    build = REGISTRY[name]
    unknown = sorted(set(kwargs) - set(build.options))
    if unknown:
        raise ValueError(f"dataset {name!r} got unknown options {unknown}; it takes "
                         f"{list(build.options)}")
    return build(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split, **kwargs)


__all__ = [
    "BOS", "BYTE_VOCAB_SIZE", "EOS", "EXTERNAL", "MASK", "OFFSET", "PAD", "SEP", "TASKS", "REGISTRY",
    "ByteLM", "ByteMLM", "Copy", "Corpus", "Dataset", "Duplicates", "MQAR", "Majority",
    "MaskedCopy", "PackedBytes", "Reverse", "Sort", "StepIterator", "SyntheticTask",
    "ByteTokenizer", "TextFiles", "bert_corrupt", "check_vocab", "corpus_from_paths",
    "decode_bytes", "encode_bytes", "list_datasets", "load_tokenizer", "make_dataset",
    "make_tokenizer", "model_tokenizer", "pack", "records", "register_dataset",
    "stdlib_corpus",
]
