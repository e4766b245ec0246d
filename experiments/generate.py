"""Samples from a training run's latest checkpoint, or from a Hugging Face checkpoint.

  python experiments/generate.py --workdir=/tmp/tx/lm --prompt="def main(" --max_new_tokens=64
  python experiments/generate.py --workdir=/tmp/tx/lm --prompt="import " --temperature=0.8 --top_p=0.9
  python experiments/generate.py --workdir=/tmp/tx/lm --prompt="class " --num_beams=4
  python experiments/generate.py --hf=/ckpt/llama --prompt="The capital of France is"

The prompt is text when the model has a tokenizer: the checkpoint's or run's tokenizer.json
(or --tokenizer), or tx's byte vocabulary for a byte model. Other models take space-separated
token ids. The prompt starts with the tokenizer's BOS, and generation stops at its EOS.
"""

from tx.experiments import _cli, _pretrained
from absl import flags

from tx import flags as tx_flags
from tx.inference import Greedy, Sample, beam_search, generate
# Reached through this module by tests that run main() in-process with a stand-in model.
from tx.train import configs as configs_lib, workdir as workdir_lib  # noqa: F401

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_HF = flags.DEFINE_string("hf", None, "A Hugging Face checkpoint directory (config.json, "
                          "*.safetensors, tokenizer.json) to sample from instead of --workdir.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer.json (or its directory) "
                                 "instead of the model's own.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text (models with a tokenizer) or token ids.")
_STEPS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the smallest set with this mass.")
_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams when > 1.")
_CACHE = flags.DEFINE_enum("cache", "contiguous", ["contiguous", "paged", "none"],
                           "KV cache (beam search: contiguous or paged; beams share pages).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_KV_DTYPE = flags.DEFINE_string("kv_dtype", None, "KV cache storage: auto (the compute "
                                "dtype), int8, int4 (KIVI, needs --cache=paged) or "
                                "int4_per_token; default: the run's config.inference.kv_dtype.")


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors(ValueError, FileNotFoundError):
        if _KV_DTYPE.value:  # a bad name or cache pairing fails before the model loads
            tx_flags.cache(_CACHE.value, kv_dtype=_KV_DTYPE.value)
        source = _pretrained.load_source(_HF.value, _WORKDIR.value)
        tokenizer = _pretrained.tokenizer_of(source, _TOKENIZER.value)
        prompt, stop = _pretrained.encode_prompt(_PROMPT.value, tokenizer)
        kv_dtype = _KV_DTYPE.value or (configs_lib.kv_dtype(source.config)
                                       if source.config is not None else "auto")
        cache = tx_flags.cache(_CACHE.value, kv_dtype=kv_dtype)
        if _BEAMS.value > 1:
            out = beam_search(source.model, prompt, max_new_tokens=_STEPS.value,
                              num_beams=_BEAMS.value, stop_tokens=stop, cache=cache)
        else:
            strategy = Greedy() if _TEMPERATURE.value == 0 else Sample(
                _TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
            out = generate(source.model, prompt, max_new_tokens=_STEPS.value,
                           strategy=strategy, stop_tokens=stop, cache=cache,
                           seed=_SEED.value)
    tokens = out.tokens[0, :out.lengths[0]]
    print(f"# checkpoint {source.label}")
    print(tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens)))


def cli() -> None:
    """The console entry point (``tx-generate``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
