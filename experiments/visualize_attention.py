"""Draws attention-weight maps (one row per layer, one column per head) for one input as a PNG.

  python experiments/visualize_attention.py --workdir=/tmp/tx/lm --text="def f(x): return x"
  python experiments/visualize_attention.py --config=configs/mqar.py --workdir=/tmp/tx/mqar

With a checkpoint in --workdir its weights are used (and its saved config when --config is
not given); without one, a freshly initialised model. Without --text the first eval example.
"""

import os

import numpy as np
from tx.experiments import _cli
from absl import flags
from ml_collections import config_flags

from tx import data
from tx.research import plots, visualize
from tx.train import configs, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_TEXT = flags.DEFINE_string("text", None, "Input text (byte-level models).")
_OUTPUT = flags.DEFINE_string("output", None, "PNG path (default: WORKDIR/attention.png).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    _cli.start(argv)
    with _cli.one_line_errors():
        config = _CONFIG.value if _CONFIG.value is not None else loop.saved_config(_WORKDIR.value)
        resolved = configs.resolve(config)
        if _TEXT.value is not None:
            batch = {"inputs": _text_ids(resolved, _TEXT.value)[None, :]}
    model, step = loop.load_model(resolved, _WORKDIR.value)
    if _TEXT.value is None:
        batch = configs.make_datasets(resolved)[1].batch(0)
    maps = visualize.attention_maps(model, batch)
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, "attention.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    plots.attention_grid(maps, out, title=f"{resolved.flags.attention}, "
                         f"{'step ' + str(step) if step else 'untrained'}")
    print(f"wrote {out} ({len(maps)} layers x {np.shape(maps[0])[0]} heads)")


def _text_ids(resolved, text: str) -> np.ndarray:
    """``text`` as byte ids (the head's other batch keys are filled by ``visualize``); fails
    in one line when the model does not read bytes or the text does not fit."""
    model = resolved.model
    if model.vocab_size < data.BYTE_VOCAB_SIZE:
        raise configs.ConfigError(
            f"--text: config.model.vocab_size={model.vocab_size} is not a byte-level model "
            f"(needs >= {data.BYTE_VOCAB_SIZE}); drop --text to draw the first eval example.")
    ids = data.encode_bytes(text)
    if not len(ids):
        raise configs.ConfigError("--text is empty: give some text, or drop --text to draw "
                                  "the first eval example.")
    max_len = getattr(model.positions, "max_len", None)
    if max_len is not None and len(ids) > max_len:
        raise configs.ConfigError(f"--text is {len(ids)} bytes long: the model's learned "
                                  f"positions take at most config.model.max_len={max_len}; "
                                  "shorten it.")
    return ids


if __name__ == "__main__":
    _cli.run(main)
