"""Token ids shared by every tx dataset.

Ids below ``OFFSET`` are special; ordinary symbols start at ``OFFSET``. Byte-level text maps byte
``b`` to ``OFFSET + b``, so a byte model needs ``BYTE_VOCAB_SIZE = OFFSET + 256`` embeddings.
Ids 5..7 are reserved so new specials never shift the byte ids of a trained model.
"""

from __future__ import annotations

import numpy as np

PAD = 0
BOS = 1
EOS = 2
MASK = 3
SEP = 4
OFFSET = 8
BYTE_VOCAB_SIZE = OFFSET + 256

SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", MASK: "<mask>", SEP: "<sep>"}


def encode_bytes(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of ``text`` (or the bytes themselves) as int32 ids ``OFFSET + byte``."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray, memoryview)):
        raise TypeError(f"encode_bytes takes str or bytes, got {type(text).__name__}")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32) + OFFSET


def decode_bytes(ids) -> str:
    """Inverse of :func:`encode_bytes`; special ids (and ids past the byte range) are skipped.

    Invalid UTF-8 (a window cut inside a multi-byte character) decodes with U+FFFD.
    """
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    ids = ids[(ids >= OFFSET) & (ids < BYTE_VOCAB_SIZE)]
    return (ids - OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
