"""Encoder-decoder (T5/Vaswani-style) on a synthetic seq2seq task: copy, reverse or sort.

  python experiments/train.py --config=configs/seq2seq.py:reverse --workdir=/tmp/tx/rev
"""

from tx.flags import ModelFlags
from tx.train.configs import experiment

TASKS = ("copy", "reverse", "sort")


def get_config(task: str = "reverse"):
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {TASKS}, e.g. "
                         "--config=configs/seq2seq.py:sort")
    model = ModelFlags(task="seq2seq", vocab_size=32, d_model=128,
                       num_layers=2, num_heads=4, d_ff=512, max_len=64, positions="rope")
    return experiment(model, dataset=task, seq_len=24, options=dict(num_symbols=16),
                      steps=600, batch_size=32, learning_rate=2e-3, warmup_steps=50,
                      eval_every=200, checkpoint_every=200)
