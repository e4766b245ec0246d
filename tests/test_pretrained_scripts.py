"""Pretrained checkpoints end to end: a tiny LLaMA (hf.save) with a BPE tokenizer trained here
starts a run on tokenised text (config.init.hf); ``tx-export`` writes the run back out and
``transformers`` loads it with the same logits; ``generate.py --hf`` prints text matching
``transformers``' greedy decoding; ``evaluate.py --text`` reports packed, per-document
perplexity matching a per-document reference. Two script runs in all; export and the bad
inputs are checked in-process (experiments/_pretrained.py). No downloads."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
torch.set_num_threads(1)  # the CPU is shared with JAX

from tx.experiments import _pretrained  # noqa: E402
from tests.tx import hf_util  # noqa: E402
from tests.tx.tokenizer_util import build_bpe, training_text  # noqa: E402
from tx import models  # noqa: E402
from tx.data.packing import packed_batches  # noqa: E402
from tx.data.tokenizer import load_tokenizer  # noqa: E402
from tx.flags import ModelFlags, model_config  # noqa: E402
from tx.interop import hf  # noqa: E402
from tx.train import configs as configs_lib  # noqa: E402
from tx.train import loop  # noqa: E402
from tx.train.configs import ConfigError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 320  # the model's; the tokenizer has 300 (a padded model vocabulary is fine)
LLAMA = dict(activation="swiglu", norm="rmsnorm", positions="rope", num_kv_heads=2,
             tie_embeddings=False, norm_eps=1e-5, attention="causal")


def script(name, *args) -> str:
    """The script's stdout; read as bytes, so a generated carriage return stays one."""
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args],
                         cwd=ROOT, capture_output=True, timeout=240)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return out.stdout.decode()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LLaMA with its tokenizer (an HF directory), text files, and a 1-step run that
    started from it on those files, tokenised."""
    root = tmp_path_factory.mktemp("pretrained")
    tok = build_bpe(root / "tok")
    model = models.build(model_config(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                                      d_ff=48, **LLAMA), seed=3)
    hf.save(model, root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "tok" / name, root / "hf" / name)
    text = training_text()
    docs = []
    for i, size in enumerate((400, 1500, 90, 700)):
        docs.append(root / f"doc{i}.txt")
        docs[-1].write_text(text[3000 * i:3000 * i + size])
    config = configs_lib.experiment(
        ModelFlags(task="lm"), dataset="text_files", seq_len=32,
        options=dict(paths=",".join(map(str, docs[:3])), eval_paths=str(docs[3]), tokenizer=tok),
        steps=1, batch_size=4, learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=1,
        eval_batches=1, checkpoint_every=1, async_checkpoints=False)
    config.init.hf = str(root / "hf")
    loop.run(config, root / "workdir", print_fn=None)
    return types.SimpleNamespace(root=root, tok=tok, hf=root / "hf", docs=docs,
                                 workdir=root / "workdir")


@pytest.fixture(scope="module")
def exported(run):
    """tx-export's work, in-process (experiments/export.py only parses flags around it)."""
    out = run.root / "export"
    return out, _pretrained.export(str(run.workdir), str(out))


def test_export_round_trip_matches_transformers(run, exported):
    out, done = exported
    assert done == {"out": str(out), "step": 1, "model_type": "llama", "byte_level": False,
                    "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"]}
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["vocab_size"], hf_config["bos_token_id"], hf_config["eos_token_id"]) == \
        (VOCAB, 1, 2)
    model, step = loop.load_model(configs_lib.resolve(loop.saved_config(run.workdir)),
                                  run.workdir)
    assert step == 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, valid, lengths = hf_util.padded_batch(VOCAB, seed=5)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))
                   ).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    assert np.abs(got - want)[valid].max() <= hf_util.TOL
    # The tokenizer travels with the weights: transformers reads it as ours encodes.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x  # ✓"
    assert hf_tok.encode(text, add_special_tokens=False) == load_tokenizer(out).encode(text)


def test_generate_hf_prints_text_as_transformers_decodes_it(exported):
    out, _ = exported
    tok = load_tokenizer(out)
    prompt = "def main("
    stdout = script("generate", f"--hf={out}", f"--prompt={prompt}", "--max_new_tokens=8")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor(tok.document(prompt)[None, :].astype(np.int64))
    with torch.no_grad():
        new = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=8, eos_token_id=2, pad_token_id=0
                           ).numpy()[0, ids.shape[1]:]
    assert stdout == f"# checkpoint --hf={str(out)!r}\n{tok.decode(new)}\n"


def _reference_loss(ref, batches):
    """Token loss with each packed piece run alone through ``transformers`` (so no attention
    across documents and positions from 0), and with the rows run whole (segments ignored)."""
    ce = torch.nn.functional.cross_entropy
    total = naive = count = 0.0
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            seg, w = batch["segment_ids"][r], batch["weights"][r]
            tgt = torch.tensor(batch["targets"][r].astype(np.int64))
            with torch.no_grad():
                whole = ref(torch.tensor(batch["inputs"][r][None].astype(np.int64))).logits[0]
            naive += float((ce(whole, tgt, reduction="none") * torch.tensor(w)).sum())
            for s in set(seg[seg > 0].tolist()):
                at = np.flatnonzero(seg == s)
                piece = torch.tensor(batch["inputs"][r][at][None].astype(np.int64))
                with torch.no_grad():
                    logits = ref(piece).logits[0]
                total += float((ce(logits, tgt[at], reduction="none") * torch.tensor(w[at])
                                ).sum())
                count += float(w[at].sum())
    return total / count, naive / count, count


def test_evaluate_text_perplexity_is_packed_per_document(run, exported, tmp_path):
    out, _ = exported
    files = [str(p) for p in run.docs[:2]]
    result = tmp_path / "ppl.json"
    stdout = script("evaluate", f"--workdir={run.workdir}", f"--text={','.join(files)}",
                    "--seq_len=32", "--batch_size=2", f"--output={result}")
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got == json.loads(result.read_text())
    tok = load_tokenizer(run.tok)
    docs = tok.documents([pathlib.Path(f).read_text() for f in files])
    assert got["tokens"] == sum(len(d) for d in docs) and got["documents"] == 2
    assert got["step"] == 1 and got["tokenizer"] == str(run.workdir / "tokenizer.json")
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-6)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want, naive, count = _reference_loss(ref, packed_batches(docs, 32, 2, eos_id=tok.eos_id))
    assert count == got["tokens"]
    assert abs(got["loss"] - want) <= 1e-4
    assert abs(naive - want) > 1e-3  # the check can tell packed-aware from naive


def test_bad_inputs_fail_naming_the_option(run, tmp_path):
    with pytest.raises(ConfigError, match=r"--hf='.*tok' and --workdir='.*': give one"):
        _pretrained.check_source(str(run.root / "tok"), str(run.workdir))
    with pytest.raises(ConfigError, match=r"--hf='.*tok': no config\.json there"):
        _pretrained.load_source(str(run.root / "tok"), None)
    with pytest.raises(ConfigError, match="give --workdir="):
        _pretrained.check_source(None, None)
    # A tokenizer larger than the model's vocabulary: named, with both sizes and the fix.
    big = build_bpe(tmp_path / "big", vocab_size=400)
    source = _pretrained.Source(types.SimpleNamespace(config=types.SimpleNamespace(
        vocab_size=VOCAB)), f"--hf={str(run.hf)!r}", str(run.hf))
    with pytest.raises(ValueError) as e:
        _pretrained.tokenizer_of(source, big)
    assert all(s in str(e.value) for s in (f"--hf={str(run.hf)!r}", big, "vocab_size=400",
                                           f"vocab_size={VOCAB}", "vocab_size >= 400"))
    with pytest.raises(ValueError, match=r"--prompt='hello': this model has no tokenizer"):
        _pretrained.encode_prompt("hello", None)
    # A run with no Hugging Face equivalent (GPT-2 blocks, local attention) is refused before
    # any weights are read (this workdir has none), and nothing is written.
    bad = tmp_path / "gpt2_local"
    bad.mkdir()
    config = configs_lib.experiment(
        ModelFlags(task="lm", vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                   d_ff=64, max_len=64, activation="gelu", norm="layernorm",
                   positions="learned", attention_bias=True, mlp_bias=True, attention="local",
                   window=4),
        dataset="text_files", seq_len=32, options=dict(
            paths=str(run.docs[0]), eval_paths=str(run.docs[3]), tokenizer=run.tok))
    (bad / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(ConfigError, match=r"--workdir='.*gpt2_local' cannot be exported to "
                       "Hugging Face: this tx config has no supported Hugging Face equivalent"):
        _pretrained.export(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--out=.* is the workdir"):
        _pretrained.export(str(run.workdir), str(run.workdir))
