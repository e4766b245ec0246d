"""Synthetic tasks with known answers.

Each task is a small class with ``task`` (the batch layout, see ``tx.data``), ``vocab_size`` and
``batch(step)``, a pure function of ``(seed, step, batch_size, seq_len, task arguments, split)``.
Ordinary symbols start at ``vocab.OFFSET``; ``PAD`` fills the unused tail of a row.

Train and eval are disjoint by content: an example whose content hash falls in one bucket of
``common.EVAL_BUCKETS`` belongs to eval, every other example to train, and each split rejects the
other's examples while sampling.
"""

from __future__ import annotations

import numpy as np

from tx.data.common import check_int, check_split, in_split, step_rng
from tx.data.masking import bert_corrupt
from tx.data.vocab import BOS, EOS, OFFSET, PAD, SEP

_SPLIT_SALT = {"train": 0, "eval": 1}


class SyntheticTask:
    """Base: subclasses implement ``_sample(rng, n) -> dict of [n, ...] arrays``."""

    task: str
    vocab_size: int
    split_key = "inputs"  # the array that identifies an example, for the split hash

    def __init__(self, *, batch_size: int, seq_len: int, seed: int = 0, split: str = "train"):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.split = check_split(split)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        step = check_int("step", step, 0)
        rng = step_rng(self.seed, step, _SPLIT_SALT[self.split])
        want, parts, have = self.batch_size, [], 0
        # Oversample so one draw usually suffices (eval keeps ~1/8 of candidates).
        draw = want + want // 4 + 8 if self.split == "train" else 10 * want + 16
        for _ in range(1000):
            cand = self._sample(rng, draw)
            keep = in_split(cand[self.split_key], self.split)
            parts.append({k: v[keep] for k, v in cand.items()})
            have += int(keep.sum())
            if have >= want:
                return {k: np.concatenate([p[k] for p in parts])[:want] for k in cand}
        raise ValueError(f"{type(self).__name__}: too few distinct examples for a {self.split!r} "
                         f"split; increase seq_len or the number of symbols")

    def _sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"seed={self.seed}, split={self.split!r})")


def _valid(lengths: np.ndarray, width: int) -> np.ndarray:
    return np.arange(width)[None, :] < lengths[:, None]


def _odd_lengths(rng, n, low, high):
    """Uniform over the odd integers in [low, high] (odd lengths make majorities strict)."""
    first = low | 1
    count = (high - first) // 2 + 1
    return (first + 2 * rng.integers(0, count, n)).astype(np.int32)


# --------------------------------------------------------------------------------- seq2seq


class _Seq2Seq(SyntheticTask):
    """Source ``x`` (length ``<= seq_len - 1``) -> target ``f(x)`` of the same length.

    Keys: ``source [B, S]``, ``source_lengths [B]``, ``inputs [B, T]`` = BOS + target (teacher
    forcing), ``targets [B, T]`` = target + EOS, ``weights [B, T]`` on the target and its EOS.
    ``S = T = seq_len``: the source keeps one slot free so both sides have one length.
    """

    task = "seq2seq"
    split_key = "source"

    def __init__(self, *, batch_size: int, seq_len: int, seed: int = 0, split: str = "train",
                 num_symbols: int = 16, min_len: int = 1, max_len: int | None = None):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
        check_int("seq_len", seq_len, 2)
        self.num_symbols = check_int("num_symbols", num_symbols, 2)
        self.max_len = check_int("max_len", seq_len - 1 if max_len is None else max_len, 1)
        self.min_len = check_int("min_len", min_len, 1)
        if self.max_len > seq_len - 1:
            raise ValueError(f"max_len={max_len} must be <= seq_len - 1 = {seq_len - 1} "
                             "(the target needs room for EOS)")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len={min_len} must be <= max_len={self.max_len}")
        self.vocab_size = OFFSET + self.num_symbols

    def transform(self, source: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The answer: ``[n, S]`` targets (no EOS), PAD past each length."""
        raise NotImplementedError

    def _sample(self, rng, n):
        width = self.seq_len
        lengths = rng.integers(self.min_len, self.max_len + 1, n).astype(np.int32)
        symbols = rng.integers(OFFSET, self.vocab_size, (n, width), dtype=np.int32)
        source = np.where(_valid(lengths, width), symbols, PAD).astype(np.int32)
        targets = self.transform(source, lengths).astype(np.int32)
        targets[np.arange(n), lengths] = EOS
        inputs = np.concatenate([np.full((n, 1), BOS, np.int32), targets[:, :-1]], axis=1)
        inputs[inputs == EOS] = PAD  # nothing is fed after the last target token
        weights = _valid(lengths + 1, width).astype(np.float32)
        return {"source": source, "source_lengths": lengths, "inputs": inputs,
                "targets": targets, "weights": weights}


class Copy(_Seq2Seq):
    """Target = source."""

    def transform(self, source, lengths):
        return source.copy()


class Reverse(_Seq2Seq):
    """Target = source reversed (within its length)."""

    def transform(self, source, lengths):
        idx = lengths[:, None] - 1 - np.arange(source.shape[1])[None, :]
        out = np.take_along_axis(source, np.maximum(idx, 0), axis=1)
        return np.where(idx >= 0, out, PAD)


class Sort(_Seq2Seq):
    """Target = source sorted ascending (within its length)."""

    def transform(self, source, lengths):
        big = np.iinfo(np.int32).max
        keyed = np.sort(np.where(_valid(lengths, source.shape[1]), source, big), axis=1)
        return np.where(keyed == big, PAD, keyed)


# ------------------------------------------------------------------------------------ MQAR


class MQAR(SyntheticTask):
    """Multi-query associative recall (Arora et al. 2023, "Zoology"), as a causal LM task.

    A row of ``seq_len + 1`` tokens starts with ``num_kv_pairs`` pairs ``k v`` (distinct keys),
    then ``num_queries`` pairs ``k v`` re-asking keys from the context in random order, at random
    (ordered) pair slots with PAD between them. ``inputs``/``targets`` are the row shifted by one;
    ``weights`` is 1 exactly where ``inputs`` holds a query key, so the loss is on recalled values.
    Keys and values come from disjoint id ranges. Queries far from their key defeat attention
    windows shorter than that distance.
    """

    task = "lm"
    accuracy_name = "recall"  # the accuracy on its weighted tokens: queried values recalled

    def __init__(self, *, batch_size: int, seq_len: int, seed: int = 0, split: str = "train",
                 num_kv_pairs: int = 8, num_queries: int | None = None, num_keys: int = 64,
                 num_values: int = 64):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
        self.num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs, 1)
        self.num_keys = check_int("num_keys", num_keys, num_kv_pairs)
        self.num_values = check_int("num_values", num_values, 1)
        self.num_slots = (seq_len + 1 - 2 * num_kv_pairs) // 2
        if self.num_slots < 1:
            raise ValueError(f"seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: "
                             f"need seq_len >= {2 * num_kv_pairs + 1}")
        default = min(num_kv_pairs, self.num_slots)
        self.num_queries = check_int("num_queries", default if num_queries is None else num_queries, 1)
        if self.num_queries > min(num_kv_pairs, self.num_slots):
            raise ValueError(f"num_queries={num_queries} must be <= num_kv_pairs={num_kv_pairs} "
                             f"and <= the {self.num_slots} query slots that seq_len={seq_len} leaves")
        self.vocab_size = OFFSET + self.num_keys + self.num_values

    def _sample(self, rng, n):
        kv, q, length = self.num_kv_pairs, self.num_queries, self.seq_len + 1
        rows = np.arange(n)[:, None]
        keys = OFFSET + np.argsort(rng.random((n, self.num_keys)), axis=1)[:, :kv]
        values = OFFSET + self.num_keys + rng.integers(0, self.num_values, (n, kv))
        asked = np.argsort(rng.random((n, kv)), axis=1)[:, :q]  # which pairs are queried
        slots = np.sort(np.argsort(rng.random((n, self.num_slots)), axis=1)[:, :q], axis=1)

        seq = np.full((n, length), PAD, np.int32)
        seq[:, 0:2 * kv:2] = keys
        seq[:, 1:2 * kv:2] = values
        at = 2 * kv + 2 * slots  # [n, q] positions of the query keys
        seq[rows, at] = keys[rows, asked]
        seq[rows, at + 1] = values[rows, asked]
        weights = np.zeros((n, self.seq_len), np.float32)
        weights[rows, at] = 1.0
        return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights}


# ------------------------------------------------------------------------ classification


class Majority(SyntheticTask):
    """``seq_cls``: label 1 when most tokens come from the upper half of the symbols, else 0.

    Lengths are odd (in ``[min_len, seq_len]``) so there is never a tie. Mean pooling over the
    valid tokens suffices to solve it, so a small encoder learns it in a few hundred steps.
    """

    task = "seq_cls"
    num_classes = 2

    def __init__(self, *, batch_size: int, seq_len: int, seed: int = 0, split: str = "train",
                 num_symbols: int = 16, min_len: int | None = None):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
        self.num_symbols = check_int("num_symbols", num_symbols, 2)
        self.min_len = check_int("min_len", max(1, seq_len // 2) if min_len is None else min_len, 1)
        if self.min_len > seq_len or (self.min_len == seq_len and seq_len % 2 == 0):
            raise ValueError(f"min_len={min_len} leaves no odd length <= seq_len={seq_len}")
        self.vocab_size = OFFSET + self.num_symbols

    def _sample(self, rng, n):
        lengths = _odd_lengths(rng, n, self.min_len, self.seq_len)
        valid = _valid(lengths, self.seq_len)
        symbols = rng.integers(0, self.num_symbols, (n, self.seq_len))
        high = ((symbols >= self.num_symbols // 2) & valid).sum(axis=1)
        labels = (2 * high > lengths).astype(np.int32)
        inputs = np.where(valid, OFFSET + symbols, PAD).astype(np.int32)
        return {"inputs": inputs, "labels": labels, "lengths": lengths}


class Duplicates(SyntheticTask):
    """``token_cls``: tag each token 1 if the same symbol occurs elsewhere in the row, else 0.

    Needs attention across the whole row (an encoder task). With the default ``num_symbols ~=
    seq_len`` the two tags are roughly balanced.
    """

    task = "token_cls"
    num_classes = 2

    def __init__(self, *, batch_size: int, seq_len: int, seed: int = 0, split: str = "train",
                 num_symbols: int | None = None, min_len: int | None = None):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
        self.num_symbols = check_int("num_symbols", max(8, seq_len) if num_symbols is None
                                     else num_symbols, 2)
        self.min_len = check_int("min_len", max(1, seq_len // 2) if min_len is None else min_len, 1)
        if self.min_len > seq_len:
            raise ValueError(f"min_len={min_len} must be <= seq_len={seq_len}")
        self.vocab_size = OFFSET + self.num_symbols

    def _sample(self, rng, n):
        lengths = rng.integers(self.min_len, self.seq_len + 1, n).astype(np.int32)
        valid = _valid(lengths, self.seq_len)
        symbols = rng.integers(0, self.num_symbols, (n, self.seq_len))
        flat = (symbols + self.num_symbols * np.arange(n)[:, None])
        counts = np.bincount(flat[valid], minlength=n * self.num_symbols)
        targets = ((counts[flat] > 1) & valid).astype(np.int32)
        inputs = np.where(valid, OFFSET + symbols, PAD).astype(np.int32)
        return {"inputs": inputs, "targets": targets, "weights": valid.astype(np.float32),
                "lengths": lengths}


# ---------------------------------------------------------------------------------- MLM


class MaskedCopy(SyntheticTask):
    """``mlm`` over random symbols made recoverable: each row is ``x SEP x``.

    BERT corruption (see ``masking``) is applied to the symbols; a masked symbol can be read off
    its twin in the other half unless both are corrupted. ``lengths = 2 * len(x) + 1``.
    """

    task = "mlm"
    split_key = "targets"

    def __init__(self, *, batch_size: int, seq_len: int, seed: int = 0, split: str = "train",
                 num_symbols: int = 16, min_len: int = 1, rate: float = 0.15):
        super().__init__(batch_size=batch_size, seq_len=seq_len, seed=seed, split=split)
        self.max_len = (seq_len - 1) // 2
        if self.max_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 3 for 'x SEP x'")
        self.num_symbols = check_int("num_symbols", num_symbols, 2)
        self.min_len = check_int("min_len", min_len, 1)
        if self.min_len > self.max_len:
            raise ValueError(f"min_len={min_len} must be <= (seq_len - 1) // 2 = {self.max_len}")
        self.rate = rate
        self.vocab_size = OFFSET + self.num_symbols

    def _sample(self, rng, n):
        half = rng.integers(self.min_len, self.max_len + 1, n)
        symbols = rng.integers(OFFSET, self.vocab_size, (n, self.max_len), dtype=np.int32)
        pos = np.arange(self.seq_len)[None, :]
        h = half[:, None]
        src = np.where(pos < h, pos, pos - h - 1)  # index into x for both halves
        tokens = np.take_along_axis(symbols, np.clip(src, 0, self.max_len - 1), axis=1)
        tokens = np.where(pos == h, SEP, tokens)
        tokens = np.where(pos <= 2 * h, tokens, PAD).astype(np.int32)
        maskable = tokens >= OFFSET
        out = bert_corrupt(rng, tokens, maskable, random_low=OFFSET, random_high=self.vocab_size,
                           rate=self.rate)
        out["lengths"] = (2 * half + 1).astype(np.int32)
        return out
