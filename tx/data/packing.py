"""Packing variable-length documents into fixed-length LM rows.

Within a row, each placed piece of a document is one segment: ``segment_ids`` counts 1, 2, 3...
in placement order (0 on padding) and ``positions`` restart at 0, so attention restricted to equal
segment ids never crosses documents (padding only sees padding, with zero weight).

Targets never cross a document boundary. The choice made here: a document's tokens are the
inputs, and its targets are the same tokens shifted left by one with ``eos_id`` after the last,
so the model learns where documents end and every token of every document is an input exactly
once. With ``eos_id=None`` the last token's target is PAD with weight 0 instead.

A document longer than a row is split into row-sized pieces; the last token of a non-final piece
still targets the document's next token (in another row), which is within the document.

Strategies:
  * ``sequential``: concatenate and cut at row boundaries (densest; splits documents);
  * ``first_fit``: documents (after splitting those longer than a row) go whole into the first row
    with room (greedy first-fit, in input order);
  * ``none``: one piece per row (the unpacked baseline, same keys).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from tx.data.vocab import EOS, PAD

STRATEGIES = ("sequential", "first_fit", "none")


def _pieces_sequential(lengths, row_len):
    """-> list of rows, each a list of (doc, start, stop)."""
    rows, row, used = [], [], 0
    for d, n in enumerate(lengths):
        start = 0
        while start < n:
            take = min(n - start, row_len - used)
            row.append((d, start, start + take))
            used, start = used + take, start + take
            if used == row_len:
                rows.append(row)
                row, used = [], 0
    if row:
        rows.append(row)
    return rows


def _chunks(lengths, row_len):
    for d, n in enumerate(lengths):
        for start in range(0, n, row_len):
            yield d, start, min(n, start + row_len)


def _pieces_first_fit(lengths, row_len):
    rows, free = [], []
    for d, start, stop in _chunks(lengths, row_len):
        size = stop - start
        for r, room in enumerate(free):
            if room >= size:
                break
        else:
            rows.append([])
            free.append(row_len)
            r = len(rows) - 1
        rows[r].append((d, start, stop))
        free[r] -= size
    return rows


def pack(documents: Iterable[Sequence[int]], row_len: int, *, num_rows: int | None = None,
         strategy: str = "sequential", eos_id: int | None = EOS, pad_id: int = PAD,
         return_provenance: bool = False) -> dict[str, np.ndarray]:
    """Pack token-id ``documents`` into rows of ``row_len`` for causal LM training.

    Returns ``inputs``, ``targets`` (int32), ``weights`` (float32), ``segment_ids`` and
    ``positions`` (int32), all ``[R, row_len]``. ``R`` is as many rows as needed, or exactly
    ``num_rows`` (pieces that do not fit are dropped; missing rows are all padding). Empty
    documents are skipped. With ``return_provenance``, also ``document_ids`` (index into
    ``documents``) and ``document_offsets`` (index within it), -1 on padding.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    if isinstance(row_len, bool) or not isinstance(row_len, (int, np.integer)) or row_len < 1:
        raise ValueError(f"row_len={row_len!r} must be a positive integer")
    docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in documents]
    lengths = [len(d) for d in docs]
    if strategy == "sequential":
        rows = _pieces_sequential(lengths, row_len)
    elif strategy == "first_fit":
        rows = _pieces_first_fit(lengths, row_len)
    else:
        rows = [[piece] for piece in _chunks(lengths, row_len)]
    if num_rows is not None:
        if num_rows < 0:
            raise ValueError(f"num_rows={num_rows} must be >= 0")
        rows = rows[:num_rows] + [[] for _ in range(num_rows - len(rows))]

    shape = (len(rows), row_len)
    out = {
        "inputs": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "weights": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    doc_ids = np.full(shape, -1, np.int32)
    offsets = np.full(shape, -1, np.int32)
    for r, row in enumerate(rows):
        col = 0
        for seg, (d, start, stop) in enumerate(row, start=1):
            doc, size = docs[d], stop - start
            cols = slice(col, col + size)
            out["inputs"][r, cols] = doc[start:stop]
            nxt = doc[start + 1:stop + 1]  # the next tokens, within the document
            last = pad_id if eos_id is None else eos_id
            out["targets"][r, cols] = np.append(nxt, last) if len(nxt) < size else nxt
            out["weights"][r, cols] = 1.0
            if stop == len(doc) and eos_id is None:
                out["weights"][r, col + size - 1] = 0.0
            out["segment_ids"][r, cols] = seg
            out["positions"][r, cols] = np.arange(size)
            doc_ids[r, cols] = d
            offsets[r, cols] = np.arange(start, stop)
            col += size
    if return_provenance:
        out["document_ids"] = doc_ids
        out["document_offsets"] = offsets
    return out


def packed_batches(documents: Iterable[Sequence[int]], row_len: int, batch_size: int, *,
                   eos_id: int | None = EOS, pad_id: int = PAD):
    """Every token of ``documents`` once, packed ``sequential`` ly into rows, yielded in batches
    of ``batch_size`` rows: an evaluation set (perplexity of a text) with one shape, so one
    compile. The last batch is filled with empty rows (weight 0, segment id 0)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
            batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    rows = pack(documents, row_len, strategy="sequential", eos_id=eos_id, pad_id=pad_id)
    for start in range(0, len(rows["inputs"]), batch_size):
        batch = {}
        for key, value in rows.items():
            part = value[start:start + batch_size]
            fill = pad_id if key in ("inputs", "targets") else 0
            batch[key] = np.pad(part, ((0, batch_size - len(part)), (0, 0)),
                                constant_values=np.asarray(fill, value.dtype))
        yield batch
