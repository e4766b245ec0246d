"""Samples from a training run's latest (or a given) checkpoint.

  python experiments/generate.py --workdir=/tmp/tx/lm --prompt="def main(" --max_new_tokens=64
  python experiments/generate.py --workdir=/tmp/tx/lm --prompt="import " --temperature=0.8 --top_p=0.9
  python experiments/generate.py --workdir=/tmp/tx/lm --prompt="class " --num_beams=4

Byte-level models take the prompt as text; other models take space-separated token ids.
"""

import numpy as np
from experiments import _cli
from absl import flags

from tx import flags as tx_flags
from tx.data import vocab
from tx.inference import Greedy, Sample, beam_search, generate
from tx.train import configs as configs_lib
from tx.train import loop
from tx.train.configs import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text (byte models) or token ids.")
_STEPS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the smallest set with this mass.")
_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams when > 1.")
_CACHE = flags.DEFINE_enum("cache", "contiguous", ["contiguous", "paged", "none"],
                           "KV cache (beam search: contiguous or paged; beams share pages).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir"])


def _encode(prompt: str, byte_level: bool) -> np.ndarray:
    ids = vocab.encode_bytes(prompt) if byte_level else [int(t) for t in prompt.split()]
    return np.asarray([[vocab.BOS, *ids]], np.int32)


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors(ValueError):
        resolved = configs_lib.resolve(loop.saved_config(_WORKDIR.value))
        model, step = loop.load_model(resolved, _WORKDIR.value)
        if step is None:
            raise ConfigError(f"workdir={_WORKDIR.value!r} holds no complete checkpoint.")
        byte_level = resolved.model.vocab_size == vocab.BYTE_VOCAB_SIZE
        prompt = _encode(_PROMPT.value, byte_level)
        if _BEAMS.value > 1:
            out = beam_search(model, prompt, max_new_tokens=_STEPS.value,
                              num_beams=_BEAMS.value, stop_tokens=(vocab.EOS,),
                              cache=tx_flags.cache(_CACHE.value))
        else:
            strategy = Greedy() if _TEMPERATURE.value == 0 else Sample(
                _TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
            out = generate(model, prompt, max_new_tokens=_STEPS.value, strategy=strategy,
                           stop_tokens=(vocab.EOS,), cache=tx_flags.cache(_CACHE.value),
                           seed=_SEED.value)
    tokens = out.tokens[0, :out.lengths[0]]
    print(f"# checkpoint step {step}")
    print(vocab.decode_bytes(tokens) if byte_level else " ".join(map(str, tokens)))


def cli() -> None:
    """The console entry point (``tx-generate``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
