"""Tokenizers: a checkpoint's own ``tokenizer.json``, or tx's byte vocabulary.

``load_tokenizer(path)`` reads a Hugging Face ``tokenizer.json`` (a directory holding one, or
the file) with the ``tokenizers`` library, from local files only: nothing is downloaded. Its
BOS / EOS ids come from the files beside it, first found wins: ``tokenizer_config.json`` and
``special_tokens_map.json`` (``bos_token`` / ``eos_token``, strings or ``{"content": ...}``),
then an HF ``config.json``'s ``bos_token_id`` / ``eos_token_id``, then a special token of the
tokenizer with a conventional name (``<s>``, ``</s>``, ``<|endoftext|>``, ...).

:class:`ByteTokenizer` wraps :mod:`tx.data.vocab` (``OFFSET + byte``, ``BOS``, ``EOS``), so byte
models go through the same interface. Both answer ``encode(text) -> list[int]`` (no special
tokens added), ``decode(ids) -> str`` (special tokens skipped), ``document(text)`` (BOS + the
text's ids: what a training document or a prompt starts from), ``vocab_size``, ``bos_id``,
``eos_id`` (None when the tokenizer has none) and ``name`` (its path, for messages).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Protocol, Sequence

import numpy as np

from tx.data.vocab import BOS, BYTE_VOCAB_SIZE, EOS, decode_bytes, encode_bytes

TOKENIZER_FILE = "tokenizer.json"
# What a checkpoint's tokenizer is made of; export copies these beside the weights.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
# Special tokens recognised by name when no file says which token is BOS / EOS.
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def document(self, text: str) -> np.ndarray: ...

    def documents(self, texts: Sequence[str]) -> list[np.ndarray]: ...


def _document(tokenizer, ids: Sequence[int]) -> np.ndarray:
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return np.asarray([*head, *ids], np.int32)


class ByteTokenizer:
    """tx's byte vocabulary (``tx.data.vocab``) behind the tokenizer interface."""

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    bos_id = BOS
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return encode_bytes(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return decode_bytes(np.asarray(list(ids), np.int64))

    def document(self, text: str) -> np.ndarray:
        return _document(self, self.encode(text))

    def documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.document(t) for t in texts]

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from a ``tokenizer.json`` (see :func:`load_tokenizer`)."""

    def __init__(self, tokenizer, name: str, *, bos_id: int | None, eos_id: int | None):
        self.tokenizer, self.name = tokenizer, name
        self.bos_id, self.eos_id = bos_id, eos_id
        # The largest id + 1, not the token count: added tokens may leave gaps.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def document(self, text: str) -> np.ndarray:
        return _document(self, self.encode(text))

    def documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`document` of each text, encoded as one batch (the library's threads)."""
        out = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [_document(self, e.ids) for e in out]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # an unreadable side file only loses its BOS/EOS hints
    return data if isinstance(data, dict) else {}


def _token_id(tokenizer, token) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _special_ids(tokenizer, directory: str) -> dict[str, int | None]:
    found: dict[str, int | None] = {"bos": None, "eos": None}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _json(os.path.join(directory, name))
        for kind in found:
            if found[kind] is None:
                found[kind] = _token_id(tokenizer, data.get(f"{kind}_token"))
    hf_config = _json(os.path.join(directory, "config.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for kind in found:
        value = hf_config.get(f"{kind}_token_id")
        value = value[0] if isinstance(value, list) and value else value  # LLaMA 3: several
        if found[kind] is None and isinstance(value, int) and 0 <= value < size:
            found[kind] = value
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for kind, names in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES)):
        for name in names:
            if found[kind] is None and name in specials:
                found[kind] = tokenizer.token_to_id(name)
    return found


def tokenizer_file(path: str | os.PathLike, *, option: str = "tokenizer") -> str:
    """The ``tokenizer.json`` that ``path`` (the file, or a directory holding it) names."""
    path = os.fspath(path)
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = "has no tokenizer.json" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{option}={path!r} {where}: give a Hugging Face tokenizer.json or "
                         "the directory holding it (a checkpoint or a tx workdir).")
    return file


def load_tokenizer(path: str | os.PathLike, *, option: str = "tokenizer") -> HFTokenizer:
    """The tokenizer of ``path`` (a ``tokenizer.json`` or its directory); ``option`` is the
    setting that named it, for error messages."""
    from tokenizers import Tokenizer as RustTokenizer
    file = tokenizer_file(path, option=option)
    try:
        tokenizer = RustTokenizer.from_file(file)
    except Exception as e:  # the library raises a bare Exception naming neither file nor fix
        raise ValueError(f"{option}={os.fspath(path)!r}: {file!r} is not a readable "
                         f"tokenizer.json ({e}); re-save it with tokenizers or "
                         "transformers' save_pretrained.") from None
    ids = _special_ids(tokenizer, os.path.dirname(os.path.abspath(file)))
    return HFTokenizer(tokenizer, file, bos_id=ids["bos"], eos_id=ids["eos"])


def find_tokenizer(directory: str | os.PathLike, *, option: str = "tokenizer"
                   ) -> HFTokenizer | None:
    """The tokenizer saved in ``directory`` (a checkpoint or a tx workdir), or None."""
    if os.path.isfile(os.path.join(os.fspath(directory), TOKENIZER_FILE)):
        return load_tokenizer(directory, option=option)
    return None


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> Tokenizer:
    """``tokenizer``, if its ids fit a model of ``model_vocab_size``; ``where`` names the
    model (e.g. ``--hf=PATH``). A larger model vocabulary is fine: checkpoints often pad it."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"{where}: the tokenizer {tokenizer.name!r} has vocab_size="
                         f"{tokenizer.vocab_size} but the model's vocab_size={model_vocab_size}; "
                         "use the tokenizer the model was trained with, or a model with "
                         f"vocab_size >= {tokenizer.vocab_size}.")
    return tokenizer


def model_tokenizer(directory: str | os.PathLike | None, model_vocab_size: int, *,
                    where: str, path: str | os.PathLike | None = None,
                    option: str = "tokenizer") -> Tokenizer | None:
    """The tokenizer for a model: ``path`` when given, else ``directory``'s tokenizer.json,
    else the byte vocabulary for a byte-sized model, else None (the caller takes token ids).
    Checked with :func:`check_vocab`."""
    if path:
        found = load_tokenizer(path, option=option)
    else:
        found = None if directory is None else find_tokenizer(directory, option=where)
    if found is None:
        return ByteTokenizer() if model_vocab_size == BYTE_VOCAB_SIZE else None
    return check_vocab(found, model_vocab_size, where)


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike
                         ) -> list[str]:
    """Copies a tokenizer (``source``: its tokenizer.json, or the directory holding it) into
    ``destination`` as ``tokenizer.json``, with the other :data:`TOKENIZER_FILES` beside it;
    returns the names written."""
    file = tokenizer_file(source)
    destination = os.fspath(destination)
    shutil.copyfile(file, os.path.join(destination, TOKENIZER_FILE))
    copied = [TOKENIZER_FILE]
    for name in TOKENIZER_FILES[1:]:
        src = os.path.join(os.path.dirname(file), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(destination, name))
            copied.append(name)
    return copied


def make_tokenizer(tokenizer: str | os.PathLike | Tokenizer | None, *,
                   option: str = "tokenizer") -> Tokenizer:
    """A dataset's ``tokenizer`` option: a path (loaded), a tokenizer object, or None (bytes)."""
    if tokenizer is None:
        return ByteTokenizer()
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer, option=option)
    return tokenizer


__all__ = ["ByteTokenizer", "HFTokenizer", "TOKENIZER_FILE", "TOKENIZER_FILES", "Tokenizer",
           "check_vocab", "copy_tokenizer_files", "find_tokenizer", "load_tokenizer",
           "make_tokenizer", "model_tokenizer", "tokenizer_file"]
