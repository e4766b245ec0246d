"""Every config in configs/ builds, validates and trains one step (CPU, shrunk batch)."""

import pathlib

import jax
import pytest
from flax import nnx

from tx import models
from tx.train import configs as configs_lib
from tx.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = [("decoder_lm", None), ("encoder_mlm", None), ("encoder_mlm", "cls"),
           ("seq2seq", "reverse"), ("mqar", None), ("ablation", None), ("ablation", "uptrain"),
           ("gpt2_small", None)]
# Configs whose model comes from a checkpoint (init.*): trained in their own tests.
FROM_CHECKPOINTS = {"pretrained": "tests/tx/test_pretrained_init.py"}


def _shrink(config):
    """One small step: what is tested is that the config trains, not how well."""
    t = config.train
    t.steps, t.warmup_steps, t.batch_size, t.grad_accum, t.eval_batches = 1, 0, 2, 1, 1
    t.async_checkpoints = False
    if config.model.d_model >= 512:  # the GPU config: its widths, two layers, XLA on CPU
        config.model.num_layers, config.model.implementation = 2, ("xla",)
        config.model.dtype, config.data.seq_len = "float32", 32
    return config


def test_every_config_file_is_listed():
    assert {p.stem for p in (ROOT / "configs").glob("[!_]*.py")} == \
        {n for n, _ in CONFIGS} | set(FROM_CHECKPOINTS)


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_trains_one_step(name, arg, tmp_path):
    config = _shrink(configs_lib.load_file(ROOT / "configs" / f"{name}.py", arg))
    if "sweep" in config or "variants" in config:
        from tx.research import ablation
        assert len(ablation.variant_configs(config)) == 5
        if "pretrain" in config:  # the uptraining comparison: its pretraining run
            config = _shrink(config.pretrain)
        else:
            del config["sweep"]
    summary = loop.run(config, tmp_path, print_fn=None)
    assert summary["steps"] == 1 and summary["params"] > 0
    assert (tmp_path / "checkpoints" / "1").is_dir()
    for out in ("config.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / out).exists(), out
    assert list((tmp_path / "tb").iterdir())


def test_gpt2_small_has_gpt2_small_size():
    config = configs_lib.load_file(ROOT / "configs" / "gpt2_small.py")
    cfg = configs_lib.model_config(config.model)
    abstract = nnx.eval_shape(lambda: models.build(cfg))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    # GPT-2 small is 124M with its 50k-token vocabulary; with 260 byte ids it is ~86M.
    assert 80e6 < params < 90e6, params
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.positions.max_len) == \
        (12, 12, 768, 1024)


def test_classification_variant_derives_from_the_mlm_base():
    mlm = configs_lib.load_file(ROOT / "configs" / "encoder_mlm.py")
    cls = configs_lib.load_file(ROOT / "configs" / "encoder_mlm.py", "cls")
    assert cls.model.task == "seq_cls" and mlm.model.task == "mlm"
    assert cls.model.d_model == mlm.model.d_model and cls.model.norm == mlm.model.norm


def test_model_dict_round_trips_every_field():
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    implementation = configs_lib.model_config(config.model).attention.implementation
    assert implementation == ()  # the device's order (tx.attention.defaults)
    config.model.num_kv_heads = 2  # a placeholder field takes an int
    assert configs_lib.model_config(config.model).kv_heads == 2


def test_eval_rows_may_be_longer_than_training_rows():
    """``data.eval_seq_len`` gives the eval split its own row length (length extrapolation);
    a learned position table shorter than it is refused before anything is built."""
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    config.data.eval_seq_len = 2 * config.data.seq_len
    train_ds, eval_ds = configs_lib.make_datasets(configs_lib.resolve(config))
    assert train_ds.batch(0)["inputs"].shape[1] == config.data.seq_len
    assert eval_ds.batch(0)["inputs"].shape[1] == 2 * config.data.seq_len
    mlm = configs_lib.load_file(ROOT / "configs" / "encoder_mlm.py")
    mlm.data.eval_seq_len = mlm.model.max_len + 1
    with pytest.raises(configs_lib.ConfigError, match="data.eval_seq_len=129"):
        configs_lib.resolve(mlm)
