"""A tiny decoder-only byte LM on the Python standard library's source (built-in text).

  python experiments/train.py --config=configs/decoder_lm.py --workdir=/tmp/tx/lm
  python experiments/train.py --config=configs/decoder_lm.py --config.model.attention=gqa+local
"""

from tx.config import ModelConfig
from tx.data import BYTE_VOCAB_SIZE
from tx.train.configs import experiment


def get_config():
    model = ModelConfig(family="decoder", task="lm", vocab_size=BYTE_VOCAB_SIZE, d_model=128,
                        num_layers=2, num_heads=4, d_ff=512, max_len=128, attention="mha")
    return experiment(model, dataset="bytes", seq_len=128, steps=300, batch_size=16,
                      learning_rate=3e-3, warmup_steps=20, eval_every=100, checkpoint_every=100)
