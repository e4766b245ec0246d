"""configs/ablation.py:recurrent at a tiny size: every variant (softmax, FAVOR+, the four
recurrences and the 3:1 hybrid) trains on both tasks, the speed sweep runs, and the table, the
JSON line and the crossover plot are written, with each recurrent layer's constant state. No
timing checks."""

import json
import pathlib

from tx import flags as flags_lib
from tx.inference import kv_cache_bytes
from tx.research import ablation
from tx.train.configs import load_file, model_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"full", "favor", "retnet", "gla", "mamba2", "gdn", "hybrid"}
RECURRENT = {"retnet", "gla", "mamba2", "gdn"}


def tiny_recurrent():
    """One step on MQAR (the LM task runs the same plumbing, tests/test_linear_ablation.py)
    and one speed length, on one-layer models (the hybrid's schedule cut to its first entry, a
    Gated DeltaNet layer; a longer one is refused): what is tested is the plumbing, and compiling dominates the time
    here."""
    config = load_file(ROOT / "configs" / "ablation.py", "recurrent")
    assert set(config.tasks) == {"mqar", "lm"}
    del config.tasks["lm"]
    for task in config.tasks.values():
        task.model.num_layers = 1
        task.model.update(d_model=16, d_ff=32, recurrent_chunk=8, linear_features=8)
        t = task.train
        t.steps, t.warmup_steps, t.batch_size, t.eval_batches = 1, 0, 2, 1
        t.log_every = t.eval_every = t.checkpoint_every = 1
        t.async_checkpoints = False
    for variant in config.variants.values():  # one layer holds one schedule entry
        variant.model.layer_pattern = tuple(variant.model.layer_pattern)[:1]
    c = config.crossover
    c.lengths, c.train_tokens, c.decode_tokens, c.repeats = (16,), 16, 2, 1
    c.model.update(num_layers=1, d_model=16, d_ff=32, linear_features=8, recurrent_chunk=8)
    return config


def test_recurrent_ablation_writes_table_json_and_plot(tmp_path):
    config = tiny_recurrent()
    rows = ablation.ablate(config, tmp_path, print_fn=None)
    assert {(r["task"], r["variant"]) for r in rows} == \
        {("mqar", name) for name in VARIANTS}
    for row in rows:
        for key in ("eval_loss", "eval_accuracy", "tokens_per_second"):
            assert isinstance(row[key], float), (row["task"], row["variant"], key)

    text = (tmp_path / "results.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in text
    assert "mqar eval acc" in text and "mqar eval loss" in text and "Crossover" in text
    assert "gdn faster per token than full" in text and "bytes per sequence" in text

    result = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"] for r in result["tasks"]} == VARIANTS
    speed = {r["variant"]: r for r in result["rows"]}
    assert set(speed) == VARIANTS
    for name, r in speed.items():
        for key in ("train_tokens_per_s", "decode_tokens_per_s", "cache_bytes_per_token"):
            assert r[key] > 0, (name, key)
    assert (tmp_path / "crossover.png").stat().st_size > 1000


def test_recurrent_variants_keep_a_constant_state():
    """The state bytes the crossover reports: constant in the length for the recurrences,
    growing with it for softmax, and for the 3:1 hybrid three recurrent layers' states plus
    one softmax layer's cache."""
    config = load_file(ROOT / "configs" / "ablation.py", "recurrent")
    base = config.crossover.model

    def state(name, tokens, **changes):
        model = base.copy_and_resolve_references()
        model.update(config.variants[name].model.to_dict(), **changes)
        return kv_cache_bytes(flags_lib.parse(model_flags(model)), 1, tokens)

    for name in RECURRENT:
        assert state(name, 256) == state(name, 4096) > 0, name
    assert state("full", 4096) == 16 * state("full", 256)
    one_full = state("full", 4096, num_layers=1)
    assert state("hybrid", 4096) == 3 * state("gdn", 4096, num_layers=1) + one_full
