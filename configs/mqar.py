"""Multi-query associative recall (Zoology's MQAR) with a small decoder.

Each row opens with 4 key-value pairs followed by queries re-asking those keys up to 47 tokens
later; ``eval_accuracy`` is the fraction of queried values recalled. Attention that cannot
reach a query's key (a local window shorter than the key-query distance) cannot solve it.

  python experiments/train.py --config=configs/mqar.py --workdir=/tmp/tx/mqar
"""

from tx.flags import ModelFlags
from tx.train.configs import experiment


def get_config():
    model = ModelFlags(task="lm", vocab_size=40, d_model=64, num_layers=2,
                       num_heads=4, d_ff=128, max_len=48, positions="rope", window=8,
                       stride=8)
    return experiment(model, dataset="mqar", seq_len=48,
                      options=dict(num_kv_pairs=4, num_keys=8, num_values=8),
                      steps=400, batch_size=64, learning_rate=3e-3, warmup_steps=30,
                      weight_decay=0.0, log_every=20, eval_every=100, eval_batches=4,
                      checkpoint_every=200)
