"""Real-data loaders through grain: ArrayRecord files and local Hugging Face datasets."""

import pathlib

import numpy as np
import pytest

pytest.importorskip("grain")
array_record_module = pytest.importorskip("array_record.python.array_record_module")
datasets = pytest.importorskip("datasets")

from tx import data  # noqa: E402
from tx.data import OFFSET  # noqa: E402
from tx.train import configs as configs_lib, loop  # noqa: E402
from tx.train.metrics import read_jsonl  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXTS = [f"document {i}: " + "abcdefghij"[: 1 + i % 10] for i in range(12)]


def _write_records(path, records):
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    train = _write_records(root / "train.array_record", [t.encode() for t in TEXTS])
    held_out = _write_records(root / "eval.array_record", [b"held out one", b"and two"])
    return train, held_out


def _decoded(tokens_row, segments_row):
    """Documents of one packed row, as text (targets drop nothing: inputs are the doc)."""
    out = []
    for s in np.unique(segments_row[segments_row > 0]):
        ids = tokens_row[segments_row == s] - OFFSET
        out.append(bytes(ids.astype(np.uint8)).decode())
    return out


def test_array_record_epoch_is_a_permutation_and_batches_are_pure(text_files):
    train, _ = text_files
    ds = data.make_dataset("array_record", batch_size=2, seq_len=64, seed=3, paths=train,
                           docs_per_row=2)
    assert ds.vocab_size == data.BYTE_VOCAB_SIZE and ds.num_documents == len(TEXTS)
    epoch = [d for step in range(3) for d in ds.documents(step)]  # 3 steps x 4 docs = 1 epoch
    texts = sorted(bytes((d - OFFSET).astype(np.uint8)).decode() for d in epoch)
    assert texts == sorted(TEXTS)
    second = [d for step in range(3, 6) for d in ds.documents(step)]
    assert any(not np.array_equal(a, b) for a, b in zip(epoch, second))  # reshuffled
    again = data.make_dataset("array_record", batch_size=2, seq_len=64, seed=3, paths=train,
                              docs_per_row=2)
    for key, value in ds.batch(4).items():
        np.testing.assert_array_equal(value, again.batch(4)[key])


def test_array_record_rows_are_packed_documents(text_files):
    train, held_out = text_files
    ds = data.make_dataset("array_record", batch_size=2, seq_len=64, seed=0, paths=train,
                           docs_per_row=3)
    batch = ds.batch(0)
    assert batch["inputs"].shape == (2, 64) and batch["segment_ids"].max() >= 2
    packed = [t for row in range(2)
              for t in _decoded(batch["inputs"][row], batch["segment_ids"][row])]
    want = sorted(bytes((d - OFFSET).astype(np.uint8)).decode() for d in ds.documents(0))
    assert sorted(packed) == want
    evals = data.make_dataset("array_record", batch_size=1, seq_len=32, seed=0, split="eval",
                              paths=train, eval_paths=held_out)
    assert evals.num_documents == 2


def test_int32_records_and_their_vocabulary(tmp_path):
    docs = [np.arange(5, 5 + n, dtype="<i4") for n in (3, 7, 4)]
    path = _write_records(tmp_path / "ids.array_record", [d.tobytes() for d in docs])
    ds = data.make_dataset("array_record", batch_size=3, seq_len=8, paths=path,
                           record_format="int32", vocab_size=20, strategy="none")
    got = sorted(tuple(d) for d in ds.documents(0))
    assert got == sorted(tuple(d) for d in docs) and ds.vocab_size == 20
    with pytest.raises(ValueError, match="vocab_size=10"):
        data.make_dataset("array_record", batch_size=3, seq_len=8, paths=path,
                          record_format="int32", vocab_size=10).batch(0)
    with pytest.raises(ValueError, match="needs vocab_size"):
        data.make_dataset("array_record", batch_size=3, seq_len=8, paths=path,
                          record_format="int32")


@pytest.mark.parametrize("options, match", [
    (dict(paths="/nonexistent/*.array_record"), "no such file"),
    (dict(paths="x", record_format="utf16"), "record_format='utf16'"),
    (dict(paths="x", docs_per_row=0), "docs_per_row"),
    (dict(), "needs paths="),
])
def test_array_record_bad_options(text_files, options, match):
    if options.get("paths") == "x":
        options = {**options, "paths": text_files[0]}
    with pytest.raises(ValueError, match=match):
        data.make_dataset("array_record", batch_size=2, seq_len=16, **options)


def test_hf_dataset_dict_from_disk(tmp_path):
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": TEXTS}),
        "validation": datasets.Dataset.from_dict({"text": ["held out"]})})
    splits.save_to_disk(str(tmp_path / "hf"))
    path = str(tmp_path / "hf")
    train = data.make_dataset("hf", batch_size=4, seq_len=32, path=path)
    epoch = [d for step in range(3) for d in train.documents(step)]
    assert sorted(bytes((d - OFFSET).astype(np.uint8)).decode() for d in epoch) == sorted(TEXTS)
    evals = data.make_dataset("hf", batch_size=1, seq_len=32, split="eval", path=path)
    assert bytes((evals.documents(0)[0] - OFFSET).astype(np.uint8)) == b"held out"
    with pytest.raises(ValueError, match="needs path="):
        data.make_dataset("hf", batch_size=1, seq_len=32)
    with pytest.raises(ValueError, match="column='body'"):
        data.make_dataset("hf", batch_size=1, seq_len=32, path=path, column="body")
    with pytest.raises(ValueError, match="eval_split='test'"):
        data.make_dataset("hf", batch_size=1, seq_len=32, split="eval", path=path,
                          eval_split="test")


def test_hf_token_id_column(tmp_path):
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]]})
    ds.save_to_disk(str(tmp_path / "ids"))
    lm = data.make_dataset("hf", batch_size=3, seq_len=4, path=str(tmp_path / "ids"),
                           column="input_ids", record_format="int32", vocab_size=8)
    assert sorted(tuple(d) for d in lm.documents(0)) == [(1, 2, 3), (4, 5), (6,)]


def test_training_on_array_records_resumes_exactly(text_files, tmp_path):
    """The loop trains on grain-fed data, and a resumed run sees the same batches."""
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py", "records")
    config.model.d_model, config.model.d_ff, config.model.num_layers = 16, 32, 1
    config.data.seq_len, config.model.max_len = 32, 32
    config.data.options.paths, config.data.options.eval_paths = text_files
    config.data.options.docs_per_row = 2
    t = config.train
    t.steps, t.warmup_steps, t.batch_size, t.log_every, t.eval_batches = 4, 1, 2, 1, 1
    t.eval_every, t.checkpoint_every, t.async_checkpoints = 4, 2, False
    t.schedule_steps = 4  # run b stops at 2 and is extended: the same learning-rate curve
    loop.run(config, tmp_path / "a", print_fn=None)
    full = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    t.steps = 2
    loop.run(config, tmp_path / "b", print_fn=None)
    t.steps = 4
    loop.run(config, tmp_path / "b", print_fn=None)
    resumed = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert resumed == full and len(full) == 4 and all(np.isfinite(full))


def test_hf_config_variant_builds_its_datasets(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS}),
                          "validation": datasets.Dataset.from_dict({"text": TEXTS[:2]})}
                         ).save_to_disk(str(tmp_path / "hf"))
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py", "hf")
    config.data.options.path = str(tmp_path / "hf")
    train, evals = configs_lib.make_datasets(configs_lib.resolve(config))
    assert (train.num_documents, evals.num_documents) == (len(TEXTS), 2)
    assert train.batch(0)["inputs"].shape == (config.train.batch_size, config.data.seq_len)
