"""tx.data.tokenizer: a checkpoint's tokenizer.json (a BPE trained here on local text), the
byte fallback, the vocabulary check, and text tokenised + packed by the datasets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tokenizers")

import tx.data as data  # noqa: E402
from tx.data import tokenizer as tok_lib  # noqa: E402
from tx.data.packing import packed_batches  # noqa: E402
from tests.tx.tokenizer_util import build_bpe, training_text  # noqa: E402

TEXT = "def main(argv):\n    return héllo(wörld) ✓  # tabs\tand\nnewlines\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return build_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Four documents (train) and one (eval), cut from stdlib source."""
    root = tmp_path_factory.mktemp("texts")
    text = training_text()
    paths = []
    for i, size in enumerate((300, 900, 50, 2000, 700)):
        path = root / f"doc{i}.txt"
        path.write_text(text[i * 2000:i * 2000 + size])
        paths.append(str(path))
    return paths[:4], paths[4:]


def test_load_encode_decode_and_special_ids(bpe):
    tok = tok_lib.load_tokenizer(bpe)
    assert tok.vocab_size == 300 and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode(TEXT)
    assert all(isinstance(i, int) and 3 <= i < 300 for i in ids)
    assert len(ids) < len(TEXT.encode())  # merges were learned: fewer tokens than bytes
    assert tok.decode(ids) == TEXT
    doc = tok.document(TEXT)
    assert doc.dtype == np.int32 and doc[0] == tok.bos_id and doc[1:].tolist() == ids
    assert tok.decode(doc) == TEXT  # special tokens are skipped
    assert [d.tolist() for d in tok.documents([TEXT, "x"])] == [doc.tolist(),
                                                                tok.document("x").tolist()]
    # The file itself loads the same; a directory without a tokenizer.json finds none.
    assert tok_lib.load_tokenizer(f"{bpe}/tokenizer.json").encode(TEXT) == ids
    assert tok_lib.find_tokenizer(bpe).encode(TEXT) == ids


def test_special_ids_from_each_source(bpe, tmp_path):
    # No tokenizer_config.json: an HF config.json's ids (a list: the first), then the names.
    shutil.copy(f"{bpe}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2,
                                                      "eos_token_id": [1, 0]}))
    tok = tok_lib.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    (tmp_path / "config.json").unlink()
    assert (lambda t: (t.bos_id, t.eos_id))(tok_lib.load_tokenizer(tmp_path)) == (1, 2)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>"}, "eos_token": "<pad>"}))
    assert (lambda t: (t.bos_id, t.eos_id))(tok_lib.load_tokenizer(tmp_path)) == (2, 0)


def test_missing_or_unreadable_tokenizer_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"--hf='.*' has no tokenizer\.json"):
        tok_lib.load_tokenizer(tmp_path, option="--hf")
    with pytest.raises(ValueError, match=r"tokenizer='.*nope\.json' does not exist"):
        tok_lib.load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{\"version\": 1}")
    with pytest.raises(ValueError, match="is not a readable tokenizer.json"):
        tok_lib.load_tokenizer(tmp_path)


def test_byte_fallback_is_the_byte_vocabulary(tmp_path):
    byte = tok_lib.ByteTokenizer()
    assert byte.encode(TEXT) == data.encode_bytes(TEXT).tolist()
    assert byte.decode(byte.document(TEXT)) == TEXT
    assert byte.document("ab").tolist() == [data.BOS, *data.encode_bytes("ab").tolist()]
    assert (byte.vocab_size, byte.bos_id, byte.eos_id) == (data.BYTE_VOCAB_SIZE, data.BOS,
                                                          data.EOS)
    # No tokenizer.json: bytes for a byte-sized model, token ids (None) for any other.
    assert isinstance(tok_lib.model_tokenizer(tmp_path, data.BYTE_VOCAB_SIZE, where="w"),
                      tok_lib.ByteTokenizer)
    assert tok_lib.model_tokenizer(tmp_path, 1000, where="w") is None
    assert isinstance(tok_lib.make_tokenizer(None), tok_lib.ByteTokenizer)


def test_vocab_check(bpe):
    tok = tok_lib.load_tokenizer(bpe)
    assert tok_lib.check_vocab(tok, 320, "--hf=x") is tok  # a padded model vocabulary is fine
    with pytest.raises(ValueError) as e:
        tok_lib.check_vocab(tok, 256, "--hf='/ckpt'")
    msg = str(e.value)
    assert "--hf='/ckpt'" in msg and bpe in msg and "vocab_size=300" in msg and "256" in msg
    assert "vocab_size >= 300" in msg  # the fix
    with pytest.raises(ValueError, match="vocab_size=300"):
        tok_lib.model_tokenizer(bpe, 256, where="--workdir='w'")


def test_packed_batches_have_one_shape_and_score_every_token():
    docs = [np.arange(3, 3 + n) for n in (5, 11, 2, 7)]
    batches = list(packed_batches(docs, 6, 2, eos_id=2))
    assert len(batches) == 3  # 25 tokens -> 5 rows of 6 -> batches of 2, 2, 1 + padding
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == {k: (2, 6) for k in batch}
    assert sum(b["weights"].sum() for b in batches) == 25
    assert batches[-1]["weights"][1].sum() == 0 and batches[-1]["segment_ids"][1].sum() == 0


def _check_packed_lm(batch, vocab_size, seq_len, rows):
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    for key, value in batch.items():
        assert value.shape == (rows, seq_len)
        assert value.dtype == (np.float32 if key == "weights" else np.int32)
    assert 0 <= batch["inputs"].min() and batch["inputs"].max() < vocab_size
    seg = batch["segment_ids"]
    same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)  # targets never cross a document
    np.testing.assert_array_equal(batch["targets"][:, :-1][same], batch["inputs"][:, 1:][same])


def test_text_files_tokenised_and_packed(bpe, text_files):
    train, held_out = text_files
    tok = tok_lib.load_tokenizer(bpe)
    make = lambda split, **kw: data.make_dataset(  # noqa: E731
        "text_files", batch_size=3, seq_len=32, seed=1, split=split, paths=",".join(train),
        eval_paths=held_out, tokenizer=bpe, **kw)
    ds = make("train")
    assert ds.task == "lm" and ds.vocab_size == 300
    texts = [open(p).read() for p in train]
    assert ds.num_tokens == sum(len(tok.document(t)) for t in texts)
    batch = ds.batch(0)
    _check_packed_lm(batch, 300, 32, 3)
    # An epoch is every token once: its rows' weights add up to the token count, and each
    # document's tokens, read back by segment, are BOS + the text (EOS as the last target).
    epoch = [ds.batch(s) for s in range(ds.rows_per_epoch // 3)]
    rest = ds.rows_per_epoch % 3
    weights = sum(b["weights"].sum() for b in epoch) + ds.batch(len(epoch))["weights"][:rest].sum()
    assert weights == ds.num_tokens
    np.testing.assert_array_equal(make("train").batch(5)["inputs"], ds.batch(5)["inputs"])
    assert any(not np.array_equal(ds._epoch(e)["inputs"], ds._epoch(0)["inputs"])
               for e in (1, 2, 3))  # each epoch in its own order
    rows = ds._epoch(0)
    stream = rows["inputs"][rows["weights"] > 0]
    starts = np.flatnonzero(stream == tok.bos_id)
    assert len(starts) == len(texts)
    decoded = sorted(tok.decode(part) for part in np.split(stream, starts[1:]))
    assert decoded == sorted(texts)
    assert make("eval").num_tokens == len(tok.document(open(held_out[0]).read()))
    # Byte level stays the default.
    byte = data.make_dataset("text_files", batch_size=2, seq_len=16, paths=train,
                             eval_paths=held_out)
    assert byte.vocab_size == data.BYTE_VOCAB_SIZE
    _check_packed_lm(byte.batch(0), data.BYTE_VOCAB_SIZE, 16, 2)
    with pytest.raises(ValueError, match="needs paths="):
        data.make_dataset("text_files", batch_size=2, seq_len=16)
    assert "text_files" in data.EXTERNAL


def test_records_tokenised(bpe):
    pytest.importorskip("grain")
    from tx.data.records import GrainLM
    tok = tok_lib.load_tokenizer(bpe)
    texts = ["def f(x):\n    return x\n", "class A:\n    pass\n", b"import os\n"]
    ds = GrainLM(texts, batch_size=2, seq_len=24, tokenizer=bpe, docs_per_row=2)
    assert ds.vocab_size == 300
    batch = ds.batch(0)
    _check_packed_lm(batch, 300, 24, 2)
    got = sorted(tok.decode(d) for d in ds.documents(0))
    want = sorted(t if isinstance(t, str) else t.decode() for t in texts)
    assert set(got) <= set(want) and len(got) == 4
    assert all(d[0] == tok.bos_id for d in ds.documents(0))
    with pytest.raises(ValueError, match="record_format='int32'"):
        GrainLM(texts, batch_size=2, seq_len=24, tokenizer=bpe, record_format="int32",
                vocab_size=300)
