"""configs/ablation.py:linear at a tiny size: every variant trains on both tasks, the speed
sweep runs, and the table, the JSON line and the crossover plot are written. No timing checks."""

import json
import pathlib

from tx.research import ablation, crossover
from tx.train.configs import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"full", "local", "favor", "hybrid"}


def tiny_linear():
    """Two steps per task and one speed length, on one-layer models: what is tested is the
    plumbing, and compiling dominates the time here."""
    config = load_file(ROOT / "configs" / "ablation.py", "linear")
    for task in config.tasks.values():
        task.model.num_layers = 1
        t = task.train
        t.steps, t.warmup_steps, t.batch_size, t.eval_batches = 2, 0, 2, 1
        t.log_every = t.eval_every = t.checkpoint_every = 2
        t.async_checkpoints = False
    config.tasks.lm.data.seq_len = 32
    for variant in config.variants.values():  # one layer holds one schedule entry (the
        variant.model.layer_pattern = tuple(variant.model.layer_pattern)[:1]  # hybrid: local)
    c = config.crossover
    c.lengths, c.train_tokens, c.decode_tokens, c.repeats = (32,), 32, 2, 1
    c.model.num_layers, c.model.d_model, c.model.d_ff, c.model.linear_features = 1, 16, 32, 8
    return config


def test_linear_ablation_writes_table_json_and_plot(tmp_path):
    config = tiny_linear()
    rows = ablation.ablate(config, tmp_path, print_fn=None)
    assert {(r["task"], r["variant"]) for r in rows} == \
        {(task, name) for task in ("mqar", "lm") for name in VARIANTS}
    for row in rows:
        for key in ("eval_loss", "eval_accuracy", "tokens_per_second"):
            assert isinstance(row[key], float), (row["task"], row["variant"], key)

    text = (tmp_path / "results.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in text
    assert "mqar eval acc" in text and "lm eval loss" in text and "Crossover" in text

    line = (tmp_path / "results.json").read_text()
    assert line.count("\n") == 1
    result = json.loads(line)
    assert {r["variant"] for r in result["tasks"]} == VARIANTS
    assert set(result["crossover"]) == {"train", "decode"}
    speed = result["rows"]
    assert {(r["variant"], r["length"]) for r in speed} == {(name, 32) for name in VARIANTS}
    for r in speed:
        for key in ("train_tokens_per_s", "decode_tokens_per_s", "cache_bytes_per_token"):
            assert r[key] > 0, (r["variant"], r["length"], key)

    assert (tmp_path / "crossover.png").stat().st_size > 1000
    for task in ("mqar", "lm"):
        assert (tmp_path / task / "results.md").exists()


def test_crossover_length_is_where_the_line_stays_below():
    def rows(fast, slow):
        return [{"variant": v, "length": t, "x": y} for v, ys in (("a", fast), ("b", slow))
                for t, y in zip((1, 2, 4), ys)]
    assert crossover.crossover_length(rows((3, 2, 1), (1, 2, 3)), "x", ("a", "b")) == 4
    assert crossover.crossover_length(rows((3, 1, 1), (1, 2, 3)), "x", ("a", "b")) == 2
    assert crossover.crossover_length(rows((0, 3, 1), (1, 2, 3)), "x", ("a", "b")) == 4
    assert crossover.crossover_length(rows((3, 3, 3), (1, 2, 3)), "x", ("a", "b")) is None
