"""Evaluates a checkpoint: a tx run on its eval split, or the perplexity of text files.

  python experiments/evaluate.py --workdir=/tmp/tx/lm [--config=configs/decoder_lm.py] [--step=200]
  python experiments/evaluate.py --workdir=/tmp/tx/lm --text=notes.txt,docs/ --output=ppl.json
  python experiments/evaluate.py --hf=/ckpt/llama --text=notes.txt --seq_len=512

With ``--text`` (files or directories, comma-separated; one document per file) the text is
tokenised with the model's tokenizer (the checkpoint's or run's tokenizer.json, --tokenizer, or
bytes for a byte model), packed into rows of ``--seq_len`` with segment ids (no attention across
documents; padding scores nothing), and the token loss and perplexity are printed as one JSON
line. ``--output`` also writes the result as JSON.
"""

import json
import math

from tx.experiments import _cli, _pretrained
from absl import flags
from ml_collections import config_flags

from tx.models.heads import LMHead
from tx.train import configs as configs_lib
from tx.train import evaluation
from tx.train import workdir as workdir_lib
from tx.train.configs import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file or tx:NAME "
                                          "(default: the config saved in the workdir).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_HF = flags.DEFINE_string("hf", None, "A Hugging Face checkpoint directory to score --text "
                          "with, instead of --workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCHES = flags.DEFINE_integer("batches", None, "Eval batches (default: train.eval_batches).")
_TEXT = flags.DEFINE_string("text", None, "Text files or directories (comma-separated) whose "
                            "perplexity to report, instead of the eval split.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer.json (or its directory) "
                                 "instead of the model's own.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Row length for --text (default: the run's "
                                "data.seq_len; for --hf the trained length, at most 1024).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per batch for --text.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the result to this JSON file.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, _cli.PRINT_CONFIG_HELP + " Without "
                                  "--config: the config saved in --workdir.")


def _text_perplexity() -> dict:
    if not _TEXT.value:
        raise ConfigError(f"--hf={_HF.value!r} needs --text=<files to score>: a Hugging Face "
                          "checkpoint has no eval split.")
    if _CONFIG.value is not None:
        raise ConfigError("--config picks the eval split of a run; with --text the model and "
                          "its tokenizer decide. Drop --config.")
    if _SEQ_LEN.value is not None and _SEQ_LEN.value < 1:
        raise ConfigError(f"--seq_len={_SEQ_LEN.value}: must be >= 1.")
    if _BATCH_SIZE.value < 1:
        raise ConfigError(f"--batch_size={_BATCH_SIZE.value}: must be >= 1.")
    _pretrained.check_source(_HF.value, _WORKDIR.value)
    source = _pretrained.load_source(_HF.value, _WORKDIR.value, step=_STEP.value)
    tokenizer = _pretrained.tokenizer_of(source, _TOKENIZER.value)
    seq_len = _SEQ_LEN.value or _pretrained.default_seq_len(source)
    return _pretrained.perplexity(source, tokenizer, _TEXT.value, seq_len=seq_len,
                                  batch_size=_BATCH_SIZE.value)


def _print_config() -> None:
    config = _CONFIG.value
    if config is None:
        if not _WORKDIR.value:
            _cli.refuse("--print_config needs --config=<a configs/*.py file or tx:NAME> or "
                        "--workdir=<a tx run's directory>.")
        with _cli.one_line_errors():
            config = workdir_lib.saved_config(_WORKDIR.value)
    _cli.print_config(config)


def main(argv):
    _cli.start(argv)
    if _PRINT_CONFIG.value:
        return _print_config()
    with _cli.one_line_errors(ValueError, FileNotFoundError):
        if _TEXT.value or _HF.value:
            out = _text_perplexity()
            line = json.dumps(out)
        else:
            if not _WORKDIR.value:
                raise ConfigError("give --workdir=<a tx run's directory> (its eval split), or "
                                  "--text=<files> with --workdir or --hf.")
            out = evaluation.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                                      batches=_BATCHES.value)
            line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in out.items())
            config = _CONFIG.value or workdir_lib.saved_config(_WORKDIR.value)
            head = configs_lib.model_config(config.model).head
            if isinstance(head, LMHead):  # a token loss: perplexity means something
                out = {**out, "eval_perplexity": math.exp(min(out["eval_loss"], 700.0))}
    print(line)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


def cli() -> None:
    """The console entry point (``tx-evaluate``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
