"""A small byte-level BPE tokenizer for tests, trained here on local text: nothing downloaded.

``build_bpe(tmp_path)`` trains one on a few standard-library modules' source and saves
``tokenizer.json`` (plus ``tokenizer_config.json`` naming BOS / EOS) into ``tmp_path``; it
returns that directory. Ids 0, 1, 2 are ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS), as in tx's
byte vocabulary and HF LLaMA's defaults; then the 256 byte symbols, then merges. Byte-level,
so every string encodes and decodes back to itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import sysconfig

SPECIALS = ("<pad>", "<s>", "</s>")
MIN_VOCAB = len(SPECIALS) + 256  # the byte alphabet is always in the vocabulary
_SOURCES = ("textwrap.py", "string.py")  # ~30 KB of stable text, wherever Python is


def training_text() -> str:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / name).read_text(encoding="utf-8") for name in _SOURCES)


def build_bpe(path: str | os.PathLike, vocab_size: int = 300, *,
              config: bool = True) -> str:
    """Trains and saves the tokenizer into directory ``path`` (created); returns it.
    ``config=False`` leaves out ``tokenizer_config.json`` (BOS / EOS then come from the special
    tokens' names)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs >= {MIN_VOCAB} "
                         "(3 specials + 256 bytes).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = training_text()
    tokenizer.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)],
                                  trainer=trainer)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    if config:
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return str(path)
