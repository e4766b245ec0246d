"""A tiny decoder-only byte LM on the Python standard library's source (built-in text), or on
your own data through grain (``:records`` for ArrayRecord files, ``:hf`` for a local Hugging
Face dataset).

  python experiments/train.py --config=configs/decoder_lm.py --workdir=/tmp/tx/lm
  python experiments/train.py --config=configs/decoder_lm.py --config.model.attention=gqa+local
  python experiments/train.py --config=configs/decoder_lm.py:records --workdir=/tmp/tx/rec \
      --config.data.options.paths='/data/train-*.array_record' \
      --config.data.options.eval_paths=/data/eval.array_record
  python experiments/train.py --config=configs/decoder_lm.py:hf --workdir=/tmp/tx/hf \
      --config.data.options.path=/data/my_saved_dataset --config.data.options.column=text

Records hold UTF-8 text by default; token ids from your own tokenizer (of 32,000 tokens, say)
take ``--config.data.options.record_format=int32 --config.data.options.vocab_size=32000
--config.model.vocab_size=32000``.
"""

from ml_collections import config_dict

from tx.flags import ModelFlags
from tx.data import BYTE_VOCAB_SIZE
from tx.train.configs import experiment

_GRAIN = dict(record_format="bytes", vocab_size=config_dict.placeholder(int), docs_per_row=4)
_DATA = {
    None: ("bytes", {}),
    "records": ("array_record", dict(paths=config_dict.placeholder(str),
                                     eval_paths=config_dict.placeholder(str), **_GRAIN)),
    "hf": ("hf", dict(path=config_dict.placeholder(str), column="text", train_split="train",
                      eval_split="validation", **_GRAIN)),
}


def get_config(source=None):
    if source not in _DATA:
        raise ValueError(f"decoder_lm.py:{source}: choose one of {sorted(filter(None, _DATA))} "
                         "or none (built-in text).")
    dataset, options = _DATA[source]
    model = ModelFlags(task="lm", vocab_size=BYTE_VOCAB_SIZE, d_model=128,
                       num_layers=2, num_heads=4, d_ff=512, max_len=128)
    return experiment(model, dataset=dataset, options=options, seq_len=128, steps=300,
                      batch_size=16, learning_rate=3e-3, eval_every=100,
                      checkpoint_every=100)
