"""Fine-tuning or uptraining pretrained weights: the model comes from ``init.hf`` (a Hugging
Face checkpoint directory) or ``init.workdir`` (a tx run), so this config leaves every model
field at its default; swaps and non-shape overrides (pattern, window, dtype, dropout) are flags.

  python experiments/train.py --config=configs/pretrained.py --workdir=/tmp/tx/ft \
      --config.init.workdir=/tmp/tx/lm --config.init.swap.num_kv_heads=1

The default trains on the built-in byte corpus, for byte-level models (tx runs). A checkpoint
with its own ``tokenizer.json`` trains on your text tokenised with it (``:text``, dataset
``text_files``; the tokenizer defaults to the checkpoint's):

  python experiments/train.py --config=configs/pretrained.py:text --workdir=/tmp/tx/ft \
      --config.init.hf=/models/tiny-llama --config.data.options.paths=notes/,docs/ \
      --config.init.swap.layer_pattern=local,full --config.init.swap.window=128
"""

from ml_collections import config_dict

from tx.flags import ModelFlags
from tx.train.configs import experiment


def get_config(source=None):
    if source not in (None, "text"):
        raise ValueError(f"pretrained.py:{source}: choose 'text' or none (the byte corpus).")
    dataset, options = "bytes", {}
    if source == "text":
        dataset = "text_files"
        options = dict(paths=config_dict.placeholder(str),
                       eval_paths=config_dict.placeholder(str),
                       tokenizer=config_dict.placeholder(str))
    return experiment(ModelFlags(), dataset=dataset, options=options, seq_len=128, steps=100,
                      batch_size=16, learning_rate=1e-3, warmup_steps=10, eval_every=50,
                      checkpoint_every=50)
