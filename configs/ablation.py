"""Ablations. The default: a small decoder on MQAR comparing mha, mqa, gqa, local and sparse.

Every variant trains from the same seed on the same data order; only ``sweep.field`` changes.
The local window (8 keys) is shorter than most key-query distances, so local attention should
fail the recall that full attention solves.

  python experiments/ablate.py --config=configs/ablation.py --workdir=/tmp/tx/ablation
  python experiments/ablate.py --config=configs/ablation.py \\
      --config.sweep.field=model.num_layers --config.sweep.choices=1,2,4

``:uptrain`` is the GQA paper's uptraining comparison in miniature: pretrain an MHA byte LM
(or give ``--config.init.hf=PATH`` / ``--config.init.workdir=PATH``), then give every variant
the same small budget from those weights: MHA continued, GQA by mean-pooled K/V heads, GQA with
freshly initialised K/V projections, MQA by mean-pooling, and a sliding-window swap.

  python experiments/ablate.py --config=configs/ablation.py:uptrain --workdir=/tmp/tx/uptrain
"""

import ml_collections

from tx.train.configs import sibling


def get_config(arg=None):
    if arg == "uptrain":
        return _uptrain()
    if arg is not None:
        raise ValueError(f"ablation.py:{arg}: choose 'uptrain' or none (the MQAR sweep).")
    config = sibling(__file__, "mqar")
    config.sweep = ml_collections.ConfigDict(dict(
        field="model.attention",  # any dotted field of this config
        choices="mha,mqa,gqa,local,sparse",  # comma-separated, parsed as the field's type
    ))
    return config


def _uptrain():
    pretrain = sibling(__file__, "decoder_lm")  # a 2-layer, 4-head MHA byte LM
    pretrain.train.steps, pretrain.train.eval_every = 400, 400
    pretrain.train.checkpoint_every = 400
    config = sibling(__file__, "pretrained")  # the model comes from the pretrained weights
    config.data.seq_len = pretrain.data.seq_len
    t = config.train
    t.steps, t.warmup_steps, t.learning_rate = 60, 5, 1e-3
    t.eval_every = t.checkpoint_every = 60
    t.eval_batches, t.log_every = 8, 5
    config.pretrain = pretrain
    swaps = {
        "mha_continued": {},
        "gqa_mean_pool": dict(num_kv_heads=2),
        "gqa_random_init": dict(num_kv_heads=2, kv_init="random"),
        "mqa_mean_pool": dict(num_kv_heads=1),
        "sliding_window": dict(layer_pattern="local", window=32),
    }
    config.variants = ml_collections.ConfigDict(
        {name: {"init": {"swap": swap}} if swap else {} for name, swap in swaps.items()})
    return config
