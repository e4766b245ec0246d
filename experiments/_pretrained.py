"""What generate, evaluate and export do beyond parsing flags: a model from ``--hf`` or
``--workdir``, its tokenizer, prompts, the perplexity of text files, and the export of a run as a
Hugging Face checkpoint. No absl flags here, so tests import it. Every check on the arguments
runs before anything compiles."""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
from flax import nnx

from tx import data
from tx.data import tokenizer as tokenizer_lib
from tx.data import vocab
from tx.data.packing import packed_batches
from tx.models.heads import LMHead
from tx.train import configs as configs_lib
from tx.train import evaluation
from tx.train import workdir as workdir_lib
from tx.train.configs import ConfigError


@dataclasses.dataclass
class Source:
    """A loaded model and where it came from."""

    model: nnx.Module
    where: str  # the flag that named it, e.g. "--hf='/ckpt'", for messages
    directory: str  # where its tokenizer files would be
    step: int | None = None  # a tx run's checkpoint step
    config: ml_collections.ConfigDict | None = None  # a tx run's saved config

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.step is not None else self.where


def check_source(hf: str | None, workdir: str | None) -> None:
    """Exactly one of ``--hf`` / ``--workdir``; an ``--hf`` directory holds a config.json."""
    if hf and workdir:
        raise ConfigError(f"--hf={hf!r} and --workdir={workdir!r}: give one of them (a Hugging "
                          "Face checkpoint directory or a tx run).")
    if not (hf or workdir):
        raise ConfigError("give --workdir=<a tx run's directory> or --hf=<a Hugging Face "
                          "checkpoint directory>.")
    if hf and not os.path.isfile(os.path.join(hf, "config.json")):
        raise ConfigError(f"--hf={hf!r}: no config.json there; give a Hugging Face checkpoint "
                          "directory (save_pretrained's output: config.json, *.safetensors).")


def load_source(hf: str | None, workdir: str | None, *, step: int | None = None) -> Source:
    """The model of ``--hf`` (a Hugging Face checkpoint) or ``--workdir`` (a tx run's latest or
    ``step`` checkpoint)."""
    check_source(hf, workdir)
    if hf:
        from tx.interop import hf as hf_lib
        if step is not None:
            raise ConfigError(f"--step={step} picks a checkpoint of a --workdir run; an --hf "
                              "directory holds one set of weights. Drop --step.")
        try:
            model = hf_lib.load(hf)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--hf={hf!r}: {e}") from None
        return Source(model, f"--hf={hf!r}", hf)
    config = workdir_lib.saved_config(workdir)
    resolved = configs_lib.resolve(config)
    model, step = workdir_lib.load_model(  # parameters only, no optimizer state
        resolved, workdir, **({} if step is None else {"step": step}))
    if step is None:
        raise ConfigError(f"workdir={workdir!r} holds no complete checkpoint.")
    return Source(model, f"--workdir={workdir!r}", workdir, step, config)


def tokenizer_of(source: Source, path: str | None = None):
    """``--tokenizer`` when given; else the checkpoint's or run's ``tokenizer.json`` (for a
    run, also its ``config.data.options.tokenizer``); else bytes for a byte-sized model; else
    None (the model takes token ids). Checked against the model's vocabulary."""
    option = "--tokenizer"
    if not path and source.config is not None:
        path, option = run_tokenizer(source.directory, source.config), "tokenizer"
    return tokenizer_lib.model_tokenizer(source.directory, source.model.config.vocab_size,
                                         where=source.where, path=path, option=option)


def run_tokenizer(workdir: str, config) -> str | None:
    """A run's tokenizer.json: in the workdir (a pretrained start copies it there), else the
    one its data was tokenised with (``config.data.options.tokenizer``); None for neither."""
    own = os.path.join(workdir, tokenizer_lib.TOKENIZER_FILE)
    if os.path.isfile(own):
        return own
    path = config.get("data", {}).get("options", {}).get("tokenizer")
    return tokenizer_lib.tokenizer_file(path, option="config.data.options.tokenizer (saved in "
                                        f"--workdir={workdir!r})") if path else None


def default_seq_len(source: Source) -> int:
    """A tx run's ``data.seq_len``; a checkpoint's trained length, at most 1024."""
    if source.config is not None:
        return int(source.config.data.seq_len)
    positions = source.model.config.positions
    return min(getattr(positions, "max_len", None) or getattr(positions, "trained_len", None)
               or 1024, 1024)


def perplexity(source: Source, tokenizer, paths, *, seq_len: int, batch_size: int) -> dict:
    """Token loss and perplexity of ``source``'s model on the files ``paths`` (one document
    each, tokenised, packed with segment ids; a document's last token targets EOS)."""
    if not isinstance(source.model.config.head, LMHead):
        raise ConfigError(f"--text scores a causal LM; {source.where} is a "
                          f"{type(source.model.config.head).__name__} model.")
    if tokenizer is None:
        raise ConfigError(f"{source.where} has no tokenizer.json and is not a byte model; pass "
                          "--tokenizer=<the tokenizer.json it was trained with>.")
    max_len = getattr(source.model.config.positions, "max_len", None)
    if max_len is not None and seq_len > max_len:
        raise ConfigError(f"--seq_len={seq_len} exceeds the model's position table "
                          f"(max_len={max_len}); pass --seq_len <= {max_len}.")
    try:
        corpus = data.corpus_from_paths([p for p in paths.split(",") if p]
                                        if isinstance(paths, str) else paths)
    except ValueError as e:
        raise ConfigError(f"--text={paths!r}: {e}; give text files or directories, "
                          "comma-separated.") from None
    docs = tokenizer.documents([corpus.text(i) for i in range(len(corpus))])
    out = evaluation.evaluate_batches(source.model, packed_batches(
        docs, seq_len, batch_size, eos_id=tokenizer.eos_id))
    return {"model": source.directory, "step": source.step,
            "tokenizer": tokenizer.name, "text": list(corpus.names), "documents": len(docs),
            "seq_len": seq_len, **out}


def encode_prompt(prompt: str, tokenizer) -> tuple[np.ndarray, tuple[int, ...]]:
    """``[1, T]`` prompt ids and the stop tokens: the tokenizer's BOS + text and its EOS, or
    (no tokenizer) BOS + space-separated ids and tx's EOS."""
    if tokenizer is None:
        try:
            ids = [vocab.BOS, *(int(t) for t in prompt.split())]
        except ValueError:
            raise ValueError(f"--prompt={prompt!r}: this model has no tokenizer, so the prompt "
                             "is space-separated token ids; pass --tokenizer=<tokenizer.json> "
                             "for text.") from None
        return np.asarray([ids], np.int32), (vocab.EOS,)
    ids = tokenizer.document(prompt)
    if not len(ids):
        raise ValueError(f"--prompt={prompt!r}: the tokenizer {tokenizer.name!r} has no BOS "
                         "token to start an empty prompt; give some text.")
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    return ids[None, :], stop


def export(workdir: str, out: str, *, step: int | None = None) -> dict:
    """Writes ``workdir``'s checkpoint to ``out`` as a Hugging Face checkpoint (config.json,
    model.safetensors, the run's tokenizer files); returns ``out``, ``step``, ``model_type``,
    ``tokenizer_files`` (copied) and ``byte_level``. A model with no Hugging Face equivalent
    is refused, naming why, before any weights are read."""
    from tx.interop import hf
    if os.path.realpath(out) == os.path.realpath(workdir):
        raise ConfigError(f"--out={out!r} is the workdir, whose config.json is the run's own; "
                          "export to another directory.")
    config = workdir_lib.saved_config(workdir)
    resolved = configs_lib.resolve(config)
    try:
        hf_config = hf.hf_config_from(resolved.model)
    except ValueError as e:
        raise ConfigError(f"--workdir={workdir!r} cannot be exported to Hugging Face: {e}"
                          ) from None
    where = f"--workdir={workdir!r}"
    file = run_tokenizer(workdir, config)
    tokenizer = tokenizer_lib.model_tokenizer(None, resolved.model.vocab_size, where=where,
                                              path=file)
    model, step = workdir_lib.load_model(  # parameters only, no optimizer state
        resolved, workdir, **({} if step is None else {"step": step}))
    if step is None:
        raise ConfigError(f"workdir={workdir!r} holds no complete checkpoint.")
    extra = {} if tokenizer is None else {  # generate() in transformers stops at eos_token_id
        f"{kind}_token_id": getattr(tokenizer, f"{kind}_id") for kind in ("bos", "eos")
        if getattr(tokenizer, f"{kind}_id") is not None}
    hf.save(model, out, extra_config=extra)
    copied = [] if file is None else tokenizer_lib.copy_tokenizer_files(file, out)
    return {"out": out, "step": step, "model_type": hf_config["model_type"],
            "tokenizer_files": copied,
            "byte_level": isinstance(tokenizer, tokenizer_lib.ByteTokenizer)}
