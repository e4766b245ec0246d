"""GPT-2 small (124M: 12 layers, 12 heads, d_model 768, 1024 context) for a GPU.

Byte-level vocabulary and the built-in corpus by default; point ``data.options.paths`` at your
own text. bf16 activations, fp32 parameters and optimizer state; Pallas flash attention first.

  python experiments/train.py --config=configs/gpt2_small.py --workdir=/tmp/tx/gpt2 \
      --config.data.options.paths=/data/text
"""

from ml_collections import config_dict

from tx.flags import ModelFlags
from tx.data import BYTE_VOCAB_SIZE
from tx.train.configs import experiment


def get_config():
    model = ModelFlags(task="lm", vocab_size=BYTE_VOCAB_SIZE, d_model=768,
                       num_layers=12, num_heads=12, d_ff=3072, max_len=1024,
                       activation="gelu", norm="layernorm", positions="learned",
                       dropout_rate=0.0, implementation=("pallas", "xla"), dtype="bfloat16")
    config = experiment(model, dataset="bytes", seq_len=1024, steps=20_000, batch_size=32,
                        grad_accum=1, learning_rate=6e-4, warmup_steps=1000, weight_decay=0.1,
                        b2=0.95, clip_norm=1.0, log_every=50, eval_every=1000,
                        checkpoint_every=1000, keep=3, keep_best=1)
    config.data.options.paths = config_dict.placeholder(str)
    return config
