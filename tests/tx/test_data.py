"""tx.data: determinism, batch layouts, known answers, packing invariants, MLM rates, splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tx.data as data
from tx.data import BOS, EOS, MASK, OFFSET, PAD, SEP

KEYS = {
    "lm": {"inputs", "targets", "weights"},
    "mlm": {"inputs", "targets", "weights", "lengths"},
    "seq_cls": {"inputs", "labels", "lengths"},
    "token_cls": {"inputs", "targets", "weights", "lengths"},
    "seq2seq": {"source", "source_lengths", "inputs", "targets", "weights"},
}
PACKED = {"segment_ids", "positions"}
NAMES = data.list_datasets(built_in=True)  # the others read your files: test_records.py


def make(name, batch_size=4, seq_len=32, seed=0, split="train", **kw):
    return data.make_dataset(name, batch_size=batch_size, seq_len=seq_len, seed=seed,
                             split=split, **kw)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------- vocab


def test_vocab_constants_and_roundtrip():
    assert (PAD, BOS, EOS, MASK, SEP, OFFSET) == (0, 1, 2, 3, 4, 8)
    assert data.BYTE_VOCAB_SIZE == 264
    text = "héllo, wörld ✓\n"
    ids = data.encode_bytes(text)
    assert ids.dtype == np.int32 and ids.min() >= OFFSET and ids.max() < 264
    assert data.decode_bytes(ids) == text
    assert np.array_equal(data.encode_bytes(text.encode()), ids)
    assert data.decode_bytes(np.concatenate([[BOS], ids[:3], [PAD, EOS, MASK]])) == "hé"


# --------------------------------------------------------------- every registered dataset


def test_registry_names():
    assert {"copy", "reverse", "sort", "mqar", "classify", "tagging", "mlm", "bytes",
            "bytes_mlm", "packed_bytes"} <= set(NAMES)
    assert {make(n).task for n in NAMES} == set(KEYS)


@pytest.mark.parametrize("name", NAMES)
def test_layout_and_dtypes(name):
    ds = make(name, batch_size=3, seq_len=32)
    batch = ds.batch(0)
    expected = KEYS[ds.task] | (PACKED if name == "packed_bytes" else set())
    assert set(batch) == expected
    for key, value in batch.items():
        assert isinstance(value, np.ndarray)
        if key in ("lengths", "source_lengths", "labels"):
            assert value.shape == (3,)
        else:
            assert value.shape == (3, 32), key
        assert value.dtype == (np.float32 if key == "weights" else np.int32), key
    for key in ("inputs", "targets", "source"):
        if key in batch and not (ds.task == "token_cls" and key == "targets"):
            assert batch[key].min() >= 0 and batch[key].max() < ds.vocab_size, key
    if "weights" in batch:
        assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
        assert batch["weights"].sum() > 0
    if "labels" in batch:
        assert batch["labels"].min() >= 0 and batch["labels"].max() < ds.num_classes
    if ds.task == "token_cls":
        assert batch["targets"].max() < ds.num_classes


@pytest.mark.parametrize("name", NAMES)
def test_batch_is_a_pure_function_of_seed_and_step(name):
    a, b = make(name, seed=3), make(name, seed=3)
    assert_batches_equal(a.batch(7), b.batch(7))
    assert_batches_equal(a.batch(7), a.batch(7))
    assert not np.array_equal(a.batch(7)["inputs"], a.batch(8)["inputs"])
    assert not np.array_equal(a.batch(7)["inputs"], make(name, seed=4).batch(7)["inputs"])
    assert not np.array_equal(a.batch(7)["inputs"], make(name, seed=3, split="eval").batch(7)["inputs"])


def test_step_iterator_resumes_exactly():
    ds = make("mqar")
    it = data.StepIterator(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = data.StepIterator(make("mqar"))
    resumed.set_state(state)
    assert state == {"step": 5}
    for want in expected:
        assert_batches_equal(next(resumed), want)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*copy.*mqar"):
        make("nope")
    with pytest.raises(ValueError, match="num_kv_pairs.*takes"):
        make("copy", num_kv_pairs=3)
    with pytest.raises(ValueError, match="split"):
        make("copy", split="test")
    with pytest.raises(ValueError, match="batch_size"):
        make("copy", batch_size=0)
    with pytest.raises(ValueError, match="seq_len"):
        make("mqar", seq_len=10, num_kv_pairs=8)
    with pytest.raises(ValueError, match="max_len"):
        make("sort", seq_len=8, max_len=8)


# ------------------------------------------------------------------------- known answers


ANSWERS = {"copy": lambda x: x, "reverse": lambda x: x[::-1], "sort": np.sort}


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_seq2seq_answers_and_teacher_forcing(name):
    batch = make(name, batch_size=64, seq_len=12, num_symbols=5).batch(1)
    for b in range(64):
        n = batch["source_lengths"][b]
        src = batch["source"][b]
        assert 1 <= n <= 11 and (src[:n] >= OFFSET).all() and (src[n:] == PAD).all()
        want = np.concatenate([ANSWERS[name](src[:n]), [EOS]])
        np.testing.assert_array_equal(batch["targets"][b, :n + 1], want)
        np.testing.assert_array_equal(batch["inputs"][b, :n + 1], np.concatenate([[BOS], want[:-1]]))
        assert (batch["targets"][b, n + 1:] == PAD).all() and (batch["inputs"][b, n + 1:] == PAD).all()
        np.testing.assert_array_equal(batch["weights"][b], np.arange(12) <= n)


def test_mqar_answers_are_recoverable_from_context():
    ds = make("mqar", batch_size=32, seq_len=64, num_kv_pairs=6, num_queries=5)
    batch = ds.batch(2)
    kv = 6
    for b in range(32):
        row = np.concatenate([batch["inputs"][b], batch["targets"][b, -1:]])
        keys, values = row[0:2 * kv:2], row[1:2 * kv:2]
        assert len(set(keys)) == kv
        assert (keys < OFFSET + ds.num_keys).all() and (values >= OFFSET + ds.num_keys).all()
        asked = np.nonzero(batch["weights"][b])[0]
        assert len(asked) == 5 and asked.min() >= 2 * kv
        for t in asked:
            (j,) = np.nonzero(keys == batch["inputs"][b, t])[0]
            assert batch["targets"][b, t] == values[j]
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_majority_labels_and_balance():
    ds = make("classify", batch_size=512, seq_len=21, num_symbols=6)
    batch = ds.batch(0)
    for b in range(512):
        n = batch["lengths"][b]
        toks = batch["inputs"][b]
        assert n % 2 == 1 and (toks[n:] == PAD).all()
        high = (toks[:n] >= OFFSET + 3).sum()
        assert batch["labels"][b] == int(high > n - high)
    assert 0.35 < batch["labels"].mean() < 0.65


def test_duplicate_tags_and_balance():
    ds = make("tagging", batch_size=128, seq_len=24)
    batch = ds.batch(0)
    for b in range(128):
        n = batch["lengths"][b]
        toks = list(batch["inputs"][b, :n])
        want = [int(toks.count(t) > 1) for t in toks]
        np.testing.assert_array_equal(batch["targets"][b, :n], want)
        np.testing.assert_array_equal(batch["weights"][b], np.arange(24) < n)
    tags = batch["targets"][batch["weights"] > 0]
    assert 0.3 < tags.mean() < 0.7


@pytest.mark.parametrize("name", ["sort", "classify", "tagging", "mlm"])
def test_synthetic_train_and_eval_are_disjoint(name):
    key = {"sort": "source", "mlm": "targets"}.get(name, "inputs")
    seen = {}
    for split in ("train", "eval"):  # a tiny example space, so collisions would show
        ds = make(name, batch_size=64, split=split, seq_len=5, num_symbols=3)
        seen[split] = {tuple(r) for s in range(10) for r in ds.batch(s)[key]}
    assert seen["train"] and seen["eval"]
    assert not seen["train"] & seen["eval"]


# ------------------------------------------------------------------------------------ MLM


def test_bytes_mlm_corruption_rates():
    batch = make("bytes_mlm", batch_size=64, seq_len=256).batch(0)
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"] > 0
    maskable = targets >= OFFSET
    assert not (weights & ~maskable).any()
    assert abs(weights.sum() / maskable.sum() - 0.15) < 0.01
    assert (inputs[~weights] == targets[~weights]).all()  # only selected positions change
    sel_in, sel_tg = inputs[weights], targets[weights]
    masked = (sel_in == MASK).mean()
    kept = (sel_in == sel_tg).mean()
    assert abs(masked - 0.8) < 0.03
    assert abs(kept - 0.1 - 0.1 / 256) < 0.03
    assert abs(1 - masked - kept - 0.1) < 0.03  # random replacements
    assert (sel_in[sel_in != MASK] >= OFFSET).all()
    np.testing.assert_array_equal(batch["lengths"], 256)


def test_masked_copy_structure():
    batch = make("mlm", batch_size=64, seq_len=31).batch(4)
    for b in range(64):
        n = batch["lengths"][b]
        half = (n - 1) // 2
        tg = batch["targets"][b]
        np.testing.assert_array_equal(tg[:half], tg[half + 1:n])
        assert tg[half] == SEP and batch["inputs"][b, half] == SEP
        assert (tg[n:] == PAD).all() and (batch["inputs"][b, n:] == PAD).all()
        w = batch["weights"][b]
        assert w.sum() >= 1 and w[half] == 0 and not w[n:].any()


# -------------------------------------------------------------------------------- packing


def check_packed(out, docs, row_len, eos_id):
    ids, offs = out["document_ids"], out["document_offsets"]
    pad = ids < 0
    # padding: PAD ids, weight 0, segment 0
    assert (out["weights"][pad] == 0).all() and (out["segment_ids"][pad] == 0).all()
    assert (out["inputs"][pad] == PAD).all()
    assert (out["segment_ids"][~pad] > 0).all()
    # every document token appears exactly once, at its own offset
    for d, doc in enumerate(docs):
        where = ids == d
        order = np.argsort(offs[where], kind="stable")
        np.testing.assert_array_equal(offs[where][order], np.arange(len(doc)))
        np.testing.assert_array_equal(out["inputs"][where][order], doc)
    for r in range(ids.shape[0]):
        seg = out["segment_ids"][r]
        # segments are 1, 2, ... contiguous, each from one document, positions restarting at 0
        labels = seg[seg > 0]
        assert (np.diff(labels) >= 0).all() and (np.diff(labels) <= 1).all() and labels[0] == 1 \
            if len(labels) else True
        assert (seg[: len(labels)] > 0).all()  # padding only at the end of a row
        for s in np.unique(labels):
            cols = np.nonzero(seg == s)[0]
            assert len(np.unique(ids[r, cols])) == 1
            np.testing.assert_array_equal(out["positions"][r, cols], np.arange(len(cols)))
            np.testing.assert_array_equal(np.diff(offs[r, cols]), 1)
        # targets are the next token of the same document, EOS (or weight 0) at its end
        for c in np.nonzero(~pad[r])[0]:
            doc, o = docs[ids[r, c]], offs[r, c]
            if o + 1 < len(doc):
                assert out["targets"][r, c] == doc[o + 1] and out["weights"][r, c] == 1
            elif eos_id is None:
                assert out["weights"][r, c] == 0
            else:
                assert out["targets"][r, c] == eos_id and out["weights"][r, c] == 1


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(st.lists(st.integers(OFFSET, 263), max_size=40), max_size=12),
       row_len=st.integers(1, 17), strategy=st.sampled_from(["sequential", "first_fit", "none"]),
       eos=st.booleans())
def test_pack_invariants(docs, row_len, strategy, eos):
    eos_id = EOS if eos else None
    out = data.pack(docs, row_len, strategy=strategy, eos_id=eos_id, return_provenance=True)
    total = sum(map(len, docs))
    assert out["inputs"].shape[1] == row_len
    assert (out["document_ids"] >= 0).sum() == total
    check_packed(out, [np.asarray(d) for d in docs], row_len, eos_id)
    rows = out["inputs"].shape[0]
    if strategy == "sequential":
        assert rows == -(-total // row_len)  # dense: padding only in the last row
    if strategy == "first_fit":
        for d, doc in enumerate(docs):  # short documents are never split
            if 0 < len(doc) <= row_len:
                assert len(np.unique(np.nonzero(out["document_ids"] == d)[0])) == 1
    if strategy == "none":
        assert (out["segment_ids"] <= 1).all()


def test_pack_num_rows_truncates_and_pads():
    docs = [np.arange(8, 8 + n) for n in (5, 7, 3, 6)]
    out = data.pack(docs, 8, num_rows=6, strategy="first_fit")
    assert out["inputs"].shape == (6, 8)
    assert (out["segment_ids"][3:] == 0).all() and out["weights"][3:].sum() == 0
    out = data.pack(docs, 8, num_rows=1, strategy="sequential")
    np.testing.assert_array_equal(out["inputs"][0], [8, 9, 10, 11, 12, 8, 9, 10])
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(out["targets"][0], [9, 10, 11, 12, EOS, 9, 10, 11])
    with pytest.raises(ValueError, match="strategy"):
        data.pack(docs, 8, strategy="best_fit")


def test_packed_bytes_rows():
    ds = make("packed_bytes", batch_size=8, seq_len=64)
    docs = ds.documents(3)
    out = data.pack(docs, 64, num_rows=8, strategy="first_fit", return_provenance=True)
    assert_batches_equal({k: out[k] for k in ds.batch(3)}, ds.batch(3))
    kept = sorted(set(out["document_ids"][out["document_ids"] >= 0].tolist()))
    check_packed(out, [docs[d] if d in kept else np.zeros(0) for d in range(len(docs))], 64, EOS)
    assert (out["segment_ids"].max(axis=1) >= 1).all()
    assert out["weights"].mean() > 0.7  # rows are mostly full


# ------------------------------------------------------------------------------- corpora


def test_stdlib_corpus_split_is_disjoint_by_file():
    corpus = data.stdlib_corpus()
    train, evals = corpus.split("train"), corpus.split("eval")
    assert len(evals) >= 3 and len(train) > 10 * len(evals)
    assert not set(train.names) & set(evals.names)
    assert set(train.names) | set(evals.names) == set(corpus.names)
    assert train.num_bytes + evals.num_bytes == corpus.num_bytes <= 4 << 20
    ds_train, ds_eval = make("bytes", seq_len=64), make("bytes", seq_len=64, split="eval")
    assert not set(ds_train.corpus.names) & set(ds_eval.corpus.names)
    # eval windows are cut from the eval documents
    stream = ds_eval.corpus.stream.astype(np.int32)
    text = stream.tobytes()
    for row in ds_eval.batch(0)["inputs"]:
        assert row.tobytes() in text


def test_byte_lm_windows():
    batch = make("bytes", batch_size=8, seq_len=128).batch(0)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["weights"] == 1).all()
    assert "def " in "".join(data.decode_bytes(r) for r in make("bytes", 8, 512).batch(1)["inputs"])


def test_corpus_from_paths(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b" / "c.md").write_text("gamma " * 50)
    (tmp_path / "b" / "blob.bin").write_bytes(b"\0\1\2" * 10)
    (tmp_path / "empty.txt").write_text("")
    corpus = data.corpus_from_paths([tmp_path])
    assert [n.rsplit("/", 1)[-1] for n in corpus.names] == ["a.txt", "c.md"]
    assert data.decode_bytes(corpus.document(1)) == "gamma " * 50
    one = data.corpus_from_paths(tmp_path / "a.txt", max_bytes=10)
    assert one.num_bytes == 10
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        data.corpus_from_paths(tmp_path / "missing")
    # Documents go to eval by a hash of their path, and tmp_path differs from run to run:
    # find a folder whose two documents both hash into train, so the error always applies.
    for i in range(200):
        lone = tmp_path / f"lone{i}"
        lone.mkdir()
        (lone / "a.txt").write_text("alpha " * 50)
        (lone / "c.md").write_text("gamma " * 50)
        try:
            data.corpus_from_paths([lone]).split("eval")
        except ValueError:  # no eval document here: the case this checks
            break
    with pytest.raises(ValueError, match="no 'eval' documents"):
        make("bytes", seq_len=16, split="eval", paths=[lone])
    files = []
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}. " * 20)
        files.append(str(tmp_path / f"doc{i:02d}.txt"))
    ds = make("bytes", seq_len=16, paths=files, eval_fraction=0.25)
    ev = make("bytes", seq_len=16, paths=files, eval_fraction=0.25, split="eval")
    assert len(ev.corpus) and not set(ds.corpus.names) & set(ev.corpus.names)
    assert ds.batch(0)["inputs"].shape == (4, 16)
