"""The training loop: resume, config diffs, the non-finite guard, accumulation, ablation."""

import csv
import json
import pathlib

import numpy as np
import pytest

from tx import data
from tx.train import ablation, configs as configs_lib, loop
from tx.train.configs import ConfigError
from tx.train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny(steps=4, **train):
    config = configs_lib.load_file(ROOT / "configs" / "mqar.py")
    config.model.d_model, config.model.d_ff, config.model.num_layers = 16, 32, 1
    config.data.seq_len, config.model.max_len = 24, 24
    config.data.options.num_kv_pairs = 4
    t = config.train
    t.steps, t.warmup_steps, t.batch_size, t.log_every, t.eval_batches = steps, 1, 4, 1, 1
    t.eval_every = t.checkpoint_every = steps
    t.async_checkpoints = False
    t.update(train)
    return config


def losses(workdir):
    return [r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")]


@pytest.mark.parametrize("favor", [False, True])
def test_in_process_resume_reproduces_the_run(tmp_path, favor):
    """Also with FAVOR+ features redrawn every training call: the draw count and the
    features are model state, checkpointed, so the resumed run redraws as the first did."""
    import shutil
    config = tiny(steps=6, checkpoint_every=3)
    if favor:
        m = config.model
        m.layer_pattern, m.linear_features, m.linear_redraw, m.linear_chunk = \
            ("favor",), 16, 1, 8
    loop.run(config, tmp_path, print_fn=None)
    first = losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run had died after step 5
    lines = []
    loop.run(config, tmp_path, print_fn=lines.append)
    assert lines[0].startswith("resuming from step 3")
    assert losses(tmp_path) == first and len(first) == 6


def test_resume_with_incompatible_config_shows_a_diff(tmp_path):
    loop.run(tiny(steps=2), tmp_path, print_fn=None)
    changed = tiny(steps=4)
    changed.model.num_heads = 2
    changed.train.learning_rate = 1e-2
    with pytest.raises(ConfigError) as err:
        loop.run(changed, tmp_path, print_fn=None)
    text = str(err.value)
    assert "model.num_heads: 4 -> 2" in text and "train.learning_rate" in text
    assert "train.steps" not in text  # extending a run is allowed


def _nan_dataset(**kwargs):
    ds = data.make_dataset("mqar", **kwargs)

    class NaNWeights:
        task, vocab_size = ds.task, ds.vocab_size

        def batch(self, step):
            out = dict(ds.batch(step))
            out["weights"] = out["weights"] * np.float32("nan")
            return out
    return NaNWeights()


_nan_dataset.options = data.REGISTRY["mqar"].options


def test_nonfinite_updates_are_skipped_then_stop(tmp_path, monkeypatch):
    monkeypatch.setitem(data.REGISTRY, "nan_mqar", _nan_dataset)
    config = tiny(steps=10, max_nonfinite=3)
    config.data.name = "nan_mqar"
    with pytest.raises(loop.NonFiniteError, match="3 non-finite updates in a row"):
        loop.run(config, tmp_path, print_fn=None)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [1, 2, 3]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # MQAR rows carry equal weight, so the mean of micro-batch means is the batch mean.
    loop.run(tiny(steps=3, batch_size=8), tmp_path / "one", print_fn=None)
    loop.run(tiny(steps=3, batch_size=8, grad_accum=2), tmp_path / "two", print_fn=None)
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=2e-5)


def test_evaluate_restores_the_checkpoint(tmp_path):
    summary = loop.run(tiny(steps=2), tmp_path, print_fn=None)
    out = loop.evaluate(None, tmp_path)
    assert out["step"] == 2
    assert out["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)


def test_keep_best_keeps_the_latest_too(tmp_path):
    loop.run(tiny(steps=6, checkpoint_every=1, eval_every=1, keep=2, keep_best=1), tmp_path,
             print_fn=None)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [5, 6]
    assert len([p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]) == 1


def test_ablation_writes_results_table_csv_and_plot(tmp_path):
    config = tiny(steps=2)
    config.sweep = configs_lib.ml_collections.ConfigDict(
        dict(field="model.attention", choices="mha,local"))
    rows = ablation.ablate(config, tmp_path, print_fn=None)
    assert [r["variant"] for r in rows] == ["mha", "local"]
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["mha", "local"]
    assert {"loss", "eval_loss", "eval_accuracy", "tokens_per_second", "params",
            "kv_bytes_per_token"} <= set(table[0])
    assert "| mha |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    # Rerunning the finished ablation reports the figures each variant saved, not a resume's
    # (no tokens/s, the resume's wall time), and trains nothing.
    first = {name: (tmp_path / name).read_bytes() for name in ("results.md", "results.csv")}
    assert all((tmp_path / v / ablation.FIGURES).is_file() for v in ("mha", "local"))
    lines = []
    assert ablation.ablate(config, tmp_path, print_fn=lines.append) == rows
    assert {name: (tmp_path / name).read_bytes() for name in first} == first
    assert not any(b"nan" in text for text in first.values())
    assert not any(line.startswith("step ") for line in lines)


def test_sweep_values_are_typed_like_the_field():
    config = tiny()
    config.sweep = configs_lib.ml_collections.ConfigDict(
        dict(field="model.num_kv_heads", choices="1,2,4"))
    assert ablation.sweep_values(config) == [1, 2, 4]  # a placeholder field keeps its type
    config.sweep.choices = "1,two"
    with pytest.raises(ConfigError, match="'two' is not a valid int for model.num_kv_heads"):
        ablation.sweep_values(config)
    config.sweep.field, config.sweep.choices = "train.learning_rate", "1e-3,3e-3"
    assert ablation.sweep_values(config) == [1e-3, 3e-3]
    config.sweep.field = "model.nope"
    with pytest.raises(ConfigError, match="model.nope"):
        ablation.sweep_values(config)


def test_remat_gives_the_same_losses(tmp_path):
    loop.run(tiny(steps=2), tmp_path / "plain", print_fn=None)
    loop.run(tiny(steps=2, remat=True), tmp_path / "remat", print_fn=None)
    np.testing.assert_allclose(losses(tmp_path / "plain"), losses(tmp_path / "remat"), rtol=1e-5)


def test_sweep_over_a_placeholder_field_builds_typed_variants():
    config = tiny()
    config.sweep = configs_lib.ml_collections.ConfigDict(
        dict(field="model.num_kv_heads", choices="1,4"))
    variants = ablation.variant_configs(config)
    assert [v.model.num_kv_heads for v in variants.values()] == [1, 4]
    assert "sweep" not in variants["1"]
