"""Training from pretrained weights (``config.init``): a Hugging Face LLaMA swapped to GQA by
mean-pooling, fine-tuned, saved back and loaded by ``transformers`` with logit parity; resume
never rereads the source; bad ``init`` input fails before training, naming the option."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.tx.hf_util import TOL, hf_model, padded_batch  # noqa: E402
from tx.data.vocab import BYTE_VOCAB_SIZE  # noqa: E402
from tx.interop import hf, swap  # noqa: E402
from tx.train import configs as configs_lib  # noqa: E402
from tx.train import loop  # noqa: E402
from tx.train import pretrained as pretrained_lib  # noqa: E402
from tx.train.configs import ConfigError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny MHA LLaMA over the byte vocabulary (so the built-in byte corpus trains it)."""
    model = hf_model(transformers, torch, "LlamaForCausalLM", "LlamaConfig", spread=0.05,
                     vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _config(steps=2, **init):
    config = configs_lib.load_file(ROOT / "configs" / "pretrained.py")
    t = config.train
    t.steps, t.warmup_steps, t.batch_size, t.log_every = steps, 1, 4, 1
    t.eval_every = t.checkpoint_every = steps
    t.eval_batches, t.async_checkpoints = 1, False
    config.data.seq_len = 32
    for key, value in init.items():
        node = config.init
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def test_hf_start_swapped_to_gqa_fine_tuned_and_saved_back_matches_transformers(llama_dir,
                                                                                tmp_path):
    config = _config(hf=str(llama_dir), **{"swap.num_kv_heads": 2})
    # The weights a run starts from are the checkpoint's, K/V mean-pooled into 2 groups.
    source = hf.load(llama_dir)
    assert swap.pool_kv_heads(source, 2) is source  # in place, and returned
    merged = pretrained_lib.with_source_model(config, None)
    resolved = configs_lib.resolve(merged)
    fresh = loop.build_model(resolved)
    from flax import nnx
    start = pretrained_lib.initial_params(merged, nnx.state(fresh, nnx.Param), seed=0)
    for (path, want), (_, got) in zip(nnx.to_flat_state(nnx.state(source, nnx.Param)),
                                      nnx.to_flat_state(start)):
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]), str(path))

    lines = []
    loop.run(config, tmp_path / "run", print_fn=lines.append)
    assert any("starting from the weights of init.hf=" in line for line in lines)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["num_kv_heads"] == 2 and saved["model"]["d_model"] == 32

    # Fine-tuned tx model -> HF checkpoint -> transformers: the same logits.
    model, step = loop.load_model(configs_lib.resolve(loop.saved_config(tmp_path / "run")),
                                  tmp_path / "run")
    assert step == 2
    hf.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())[
        "num_key_value_heads"] == 2
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, valid, lengths = padded_batch(BYTE_VOCAB_SIZE, seed=1)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))
                   ).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - want)[valid].max() <= TOL

    # Resuming never reads the source again (it may be gone) nor reloads it over progress.
    shutil.rmtree(tmp_path / "gone", ignore_errors=True)
    shutil.copytree(llama_dir, tmp_path / "gone")
    config = _config(steps=3, hf=str(tmp_path / "gone"), **{"swap.num_kv_heads": 2})
    with pytest.raises(ConfigError, match=r"init\.hf: .* -> "):  # another source: refused
        loop.run(config, tmp_path / "run", print_fn=None)
    config = _config(steps=3, hf=str(llama_dir), **{"swap.num_kv_heads": 2})
    moved = llama_dir.with_name(llama_dir.name + "_moved")
    llama_dir.rename(moved)
    try:
        lines = []
        loop.run(config, tmp_path / "run", print_fn=lines.append)
    finally:
        moved.rename(llama_dir)
    assert lines[0].startswith("train.steps=3") and lines[1].startswith("model: ")
    assert "resuming from step 2" in lines[2]
    assert not any("starting from the weights" in line for line in lines)


@pytest.mark.parametrize("init,flag,match", [
    (dict(hf="/nonexistent"), None, r"config\.init\.hf='/nonexistent': no config\.json"),
    (dict(hf="LLAMA", workdir="/x"), None, "give one source"),
    (dict(hf="LLAMA", **{"swap.num_kv_heads": 3}), None, r"swap\.num_kv_heads=3: must divide"),
    (dict(hf="LLAMA", **{"swap.kv_init": "zeros"}), None, r"swap\.kv_init='zeros'"),
    (dict(hf="LLAMA"), ("d_model", 48), r"config\.model\.d_model=48: the weights of "
                                        r"config\.init\.hf"),
    (dict(**{"swap.num_kv_heads": 2}), None, r"set config\.init\.hf or config\.init\.workdir"),
    (dict(hf="WITH_TOKENIZER"), None, r"config\.data\.name='bytes': the checkpoint of "
                                      r"config\.init has its own tokenizer"),
])
def test_bad_init_fails_before_training_naming_the_option(llama_dir, tmp_path, init, flag,
                                                         match):
    if "WITH_TOKENIZER" in init.values():  # a BPE checkpoint cannot train on byte ids
        shutil.copytree(llama_dir, tmp_path / "bpe")
        (tmp_path / "bpe" / "tokenizer.json").write_text("{}")
    init = {k: str(llama_dir) if v == "LLAMA" else str(tmp_path / "bpe")
            if v == "WITH_TOKENIZER" else v for k, v in init.items()}
    config = _config(**init)
    if flag:
        config.model[flag[0]] = flag[1]
    with pytest.raises(ConfigError, match=match):
        loop.run(config, tmp_path / "run", print_fn=None)
    assert not (tmp_path / "run").exists()  # nothing written


def test_uptrain_ablation_pretrains_once_and_starts_each_variant_from_it(tmp_path):
    from tests.tx.test_train_loop import tiny
    from tx.research import ablation
    import ml_collections
    config = tiny(steps=2)
    config.pretrain = tiny(steps=2)
    config.variants = ml_collections.ConfigDict(
        {"gqa_mean_pool": {"init": {"swap": {"num_kv_heads": 2}}}})
    rows = ablation.ablate(config, tmp_path, print_fn=None)
    assert [r["variant"] for r in rows] == ["gqa_mean_pool"]
    assert "| gqa_mean_pool |" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "gqa_mean_pool" / "config.json").read_text())
    assert saved["init"]["workdir"] == str(tmp_path / "pretrain")
    assert saved["model"]["num_kv_heads"] == 2 and saved["model"]["num_heads"] == 4
    # A rerun neither pretrains again nor retrains the variant.
    log = (tmp_path / "pretrain" / "metrics.jsonl").read_text()
    lines = []
    again = ablation.ablate(config, tmp_path, print_fn=lines.append)
    assert (tmp_path / "pretrain" / "metrics.jsonl").read_text() == log
    assert not any(line.startswith(("step ", "starting from")) for line in lines)
    assert again[0]["loss"] == rows[0]["loss"]


def test_fine_tuning_on_one_text_file_names_the_eval_files_option(tmp_path):
    """One file cannot be split into train and eval documents: the refusal names the flag
    that gives the eval split its own files."""
    from tx import data
    (tmp_path / "notes.txt").write_text("alpha beta gamma " * 40)
    kwargs = dict(batch_size=2, seq_len=16, seed=0, paths=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"--config\.data\.options\.eval_paths="):
        for split in ("train", "eval"):  # the one file hashes into one of the two
            data.make_dataset("text_files", split=split, **kwargs)
    (tmp_path / "held_out.txt").write_text("delta epsilon " * 40)
    for split in ("train", "eval"):  # with the option both splits build
        data.make_dataset("text_files", split=split, eval_paths=str(tmp_path / "held_out.txt"),
                          **kwargs)
