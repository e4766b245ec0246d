"""Exports a training run's latest (or a given) checkpoint as a Hugging Face checkpoint.

  python experiments/export.py --workdir=/tmp/tx/llama --out=/tmp/hf/llama [--step=200]
  tx-export --workdir=/tmp/tx/llama --out=/tmp/hf/llama

Writes ``config.json`` and ``model.safetensors`` (``tx.interop.hf.save``: LLaMA, Mistral,
GPT-2, BERT, T5 layouts) and copies the run's tokenizer files (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), so ``transformers``'
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer`` load the result. A model with
no Hugging Face equivalent (e.g. a GPT-2 swapped to local attention) is refused, naming why,
before any weights are read.
"""

from tx.experiments import _cli, _pretrained
from absl import flags

from tx.train.configs import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_OUT = flags.DEFINE_string("out", None, "The directory to write the Hugging Face checkpoint to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors(ValueError, FileNotFoundError):
        if not _WORKDIR.value or not _OUT.value:
            raise ConfigError("give --workdir=<a tx run's directory> and --out=<a directory for "
                              "the Hugging Face checkpoint>.")
        done = _pretrained.export(_WORKDIR.value, _OUT.value, step=_STEP.value)
    files = ", ".join(done["tokenizer_files"]) or (
        "none (byte vocabulary: tx.data.vocab.encode_bytes)" if done["byte_level"] else "none")
    print(f"exported step {done['step']} of {_WORKDIR.value} to {done['out']} "
          f"(model_type={done['model_type']}; tokenizer files: {files})")


def cli() -> None:
    """The console entry point (``tx-export``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
