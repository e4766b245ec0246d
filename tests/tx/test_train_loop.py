"""The training loop: resume, config diffs, the non-finite guard, accumulation, ablation."""

import csv
import pathlib

import jax
import numpy as np
import pytest

from tx import data
from tx.research import ablation
from tx.train import configs as configs_lib, loop
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
    assert lines[0].startswith("model: ") and lines[1].startswith("resuming from step 3")
    assert losses(tmp_path) == first and len(first) == 6


def test_a_run_says_what_it_builds_then_its_backend_progress_and_evals(tmp_path):
    lines = []
    summary = loop.run(tiny(steps=4, eval_every=2), tmp_path, print_fn=lines.append)
    assert lines[0] == (f"model: {summary['params']:,} parameters | KV cache "
                        f"{summary['kv_bytes_per_token']:,} bytes/token | 1 layer, d_model 16, "
                        "4 heads, 4 K/V heads")
    assert lines[1] == "compiling the train step"
    assert lines[2].startswith("attention: ")  # at the first step, before its progress line
    assert lines[3].startswith("step      1/4 | loss")
    evals = [line for line in lines if line.startswith("eval at step")]
    records = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert evals == [f"eval at step {s}: loss {records[s]['eval_loss']:.4f}, recall "
                     f"{records[s]['eval_accuracy']:.3f}" for s in (2, 4)]  # MQAR: recall
    assert summary["accuracy_name"] == "recall"
    # Each run says its backend again, even in the same process (an ablation's variants).
    again = []
    loop.run(tiny(steps=2), tmp_path / "again", print_fn=again.append)
    assert again[2] == lines[2]


def test_the_steps_report_their_mean_loss(tmp_path):
    from tx.train import optim, step as step_lib, workdir as workdir_lib
    resolved = configs_lib.resolve(tiny())
    optimizer = optim.make_optimizer(resolved.train)
    state = step_lib.init_state(workdir_lib.build_model(resolved), optimizer)
    train_ds, _ = configs_lib.make_datasets(resolved)
    batch = train_ds.batch(0)
    metrics = step_lib.make_eval_step(state.graphdef)(state.params, state.rest, batch)
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["loss_sum"] / metrics["count"]), rel=1e-6)
    *_, metrics = step_lib.make_train_step(state.graphdef, optimizer)(*state.arrays(), batch)
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["loss_sum"] / metrics["count"]), rel=1e-6)


def test_loading_a_run_reads_its_parameters_without_optimizer_state(tmp_path, monkeypatch):
    """evaluate.py, generate.py, tx-export and pretrained starts load through
    ``workdir.load_model``: it restores params and rest into abstract targets (no train state
    built) and reads no optimizer moments, yet gets the very arrays a full restore gets."""
    from flax import nnx
    from tx.train import checkpoint, step as step_lib, workdir as workdir_lib
    loop.run(tiny(steps=2), tmp_path, print_fn=None)
    resolved = configs_lib.resolve(workdir_lib.saved_config(tmp_path))
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1, async_save=False)
    state = step_lib.create_state(lambda: workdir_lib.build_model(resolved),
                                  loop.make_optimizer(resolved.train),
                                  workdir_lib.make_parallel(resolved))
    full, _ = ckpt.restore(2, {"params": state.params, "rest": state.rest,
                               "opt_state": state.opt_state})
    ckpt.close()
    read = []
    real = checkpoint.Checkpointer.restore

    def restore(self, step, template, *args, **kwargs):
        read.append((sorted(template), kwargs.get("partial")))
        return real(self, step, template, *args, **kwargs)
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore)
    model, step = workdir_lib.load_model(resolved, tmp_path)
    assert step == 2 and read == [(["params", "rest"], True)]  # opt_state is never read
    for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                         jax.tree.leaves(full["params"])):
        np.testing.assert_array_equal(got, want)


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


def test_ablation_writes_results_table_csv_and_plot(tmp_path, monkeypatch):
    config = tiny(steps=2)
    config.sweep = configs_lib.ml_collections.ConfigDict(
        dict(field="model.attention", choices="mha,local"))
    plotted, real = [], ablation.plots.loss_curves
    monkeypatch.setattr(ablation.plots, "loss_curves", lambda runs, path, **kw: plotted.append(
        (pathlib.Path(path).name, list(runs), kw.get("metric"))) or real(runs, path, **kw))
    lines = []
    rows = ablation.ablate(config, tmp_path, print_fn=lines.append)
    assert [r["variant"] for r in rows] == ["mha", "local"]
    # What a person sees: the plan first, then each variant's number, model and backend.
    assert lines[0] == ("ablation: 2 variants of model.attention (mha, local) on mqar, 2 steps "
                        f"each, in {tmp_path}; each variant builds its model and compiles its "
                        "train step first")
    starts = [i for i, line in enumerate(lines) if line.startswith("variant ")]
    assert [lines[i] for i in starts] == ["variant 1/2: mha (model.attention=mha)",
                                          "variant 2/2: local (model.attention=local)"]
    for i in starts:
        assert lines[i + 1].startswith("model: ") and "parameters | KV cache" in lines[i + 1]
        assert lines[i + 2] == "compiling the train step"
        assert lines[i + 3].startswith("attention: ")
    assert sum(line.startswith("eval at step 2: loss ") and ", recall " in line
               for line in lines) == 2
    # Per-variant plots name their variant; the ablation's plots recall (MQAR's metric).
    assert ("loss.png", ["mha"], "recall") in plotted
    assert ("loss.png", ["local"], "recall") in plotted
    assert plotted[-1] == ("loss_curves.png", ["mha", "local"], "recall")
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


def test_loss_curves_name_every_run_and_plot_the_eval_metric_with_markers():
    from tx.research import plots
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.6,
                                          "eval_accuracy": 0.25},
               {"step": 4, "loss": 1.0, "eval_loss": 1.1, "eval_accuracy": 0.75}]
    fig = plots.loss_curves_figure({"mha": records, "local": records}, "sweep", "recall")
    loss, metric = fig.axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "mha train", "mha eval", "local train", "local eval"]
    assert [t.get_text() for t in metric.get_legend().get_texts()] == ["mha", "local"]
    assert metric.get_ylabel() == "eval recall"
    evals = [line for line in loss.get_lines() + metric.get_lines()
             if line.get_label() != "_nolegend_" and "train" not in line.get_label()]
    assert all(line.get_marker() == "o" for line in evals) and len(evals) == 4
    assert list(metric.get_lines()[0].get_ydata()) == [0.25, 0.75]
    plots._pyplot().close(fig)
