"""configs/ablation.py:classics at a tiny size: each task trains its own variants, the results
get one table per task, and the LM task evaluates on rows twice the training length."""

import json
import pathlib

from tx.research import ablation
from tx.train import configs as configs_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"mlm": {"bert", "fnet", "fnet_hybrid", "funnel", "deberta"},
            "lm": {"rope", "alibi", "xl"}}


def tiny_classics():
    """One step per variant on small rows: what is tested is the plumbing (compiling
    dominates the time here); the figures come from the full run in the README."""
    config = configs_lib.load_file(ROOT / "configs" / "ablation.py", "classics")
    for task in config.tasks.values():
        t = task.train
        t.steps, t.warmup_steps, t.batch_size, t.eval_batches = 1, 0, 2, 1
        t.log_every = t.eval_every = t.checkpoint_every = 1
        t.async_checkpoints = False
    config.tasks.mlm.data.seq_len = 32
    config.tasks.lm.data.seq_len, config.tasks.lm.data.eval_seq_len = 32, 64
    return config


def test_every_variant_resolves_at_full_size():
    config = configs_lib.load_file(ROOT / "configs" / "ablation.py", "classics")
    assert {name: set(task.variants) for name, task in config.tasks.items()} == VARIANTS
    assert config.tasks.lm.data.eval_seq_len == 2 * config.tasks.lm.data.seq_len
    params = {}
    for name, task in config.tasks.items():
        for variant, c in ablation.variant_configs(task).items():
            configs_lib.resolve(c)  # every variant builds from flags, refusals included
            params[name, variant] = c.model.to_dict()
    # FNet's MLP takes the attention's parameters: d_ff grows by 2 d_model.
    assert params["mlm", "fnet"]["d_ff"] == params["mlm", "bert"]["d_ff"] + \
        2 * params["mlm", "bert"]["d_model"]


# The runner's plumbing on two variants per task (compiling dominates; each system trains in
# its own tests, and every variant's config resolves above): Funnel's shortened rows and XL's
# memory over rows that continue across steps are the ones that reach into the runner.
RUN = {"mlm": {"fnet", "funnel"}, "lm": {"alibi", "xl"}}


def test_classics_ablation_writes_a_table_per_task(tmp_path):
    config = tiny_classics()
    for task, names in RUN.items():
        variants = config.tasks[task].variants
        for name in set(variants) - names:
            del variants[name]
    rows = ablation.ablate(config, tmp_path, print_fn=None)
    assert {(r["task"], r["variant"]) for r in rows} == \
        {(task, v) for task, names in RUN.items() for v in names}
    for row in rows:
        assert isinstance(row["eval_loss"], float) and row["params"] > 0, row
    text = (tmp_path / "results.md").read_text()
    for task, names in RUN.items():
        assert f"## {task}" in text and (tmp_path / task / "loss_curves.png").exists()
        for name in names:
            assert f"| {name} |" in text
    line = json.loads((tmp_path / "results.json").read_text())
    assert {(r["task"], r["variant"]) for r in line["tasks"]} == \
        {(r["task"], r["variant"]) for r in rows}
