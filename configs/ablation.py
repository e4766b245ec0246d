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

``:linear`` compares softmax and FAVOR+ linear attention (``tx.attention.favor``): four 4-layer
variants (full softmax, local softmax window, all FAVOR+, and the hybrid of three local layers
to one FAVOR+ layer) each train on MQAR recall and on the byte LM, then a small untrained
model of each is timed against sequence length (``tx.research.crossover``): training and decode
tokens/s, KV-cache or state bytes per token, and the length where FAVOR+ overtakes softmax.

  python experiments/ablate.py --config=configs/ablation.py:linear --workdir=/tmp/tx/linear
"""

import ml_collections

from tx.flags import ModelFlags
from tx.research import crossover
from tx.train.configs import sibling


def get_config(arg=None):
    if arg == "uptrain":
        return _uptrain()
    if arg == "linear":
        return _linear()
    if arg is not None:
        raise ValueError(f"ablation.py:{arg}: choose 'uptrain', 'linear' or none (the MQAR "
                         "sweep).")
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


# Layer patterns cycled over 4 layers: the hybrid is three local-softmax layers to one FAVOR+.
LINEAR_VARIANTS = {"full": ("full",), "local": ("local",), "favor": ("favor",),
                   "hybrid": ("local", "local", "local", "favor")}


def _linear():
    mqar = sibling(__file__, "mqar")  # window 8: shorter than most key-query distances
    mqar.train.update(steps=200, batch_size=32)
    lm = sibling(__file__, "decoder_lm")  # 128-byte rows
    lm.model.update(d_model=64, d_ff=256, window=32)
    lm.train.update(steps=120, batch_size=8)
    for task in (mqar, lm):
        task.model.num_layers = 4  # the hybrid's 3:1 needs 4 layers; every variant gets them
        t = task.train
        t.warmup_steps = min(t.warmup_steps, t.steps // 10)
        t.eval_every = t.checkpoint_every = t.steps
        t.log_every, t.eval_batches = 10, 4
    config = ml_collections.ConfigDict()
    config.tasks = ml_collections.ConfigDict(dict(mqar=mqar, lm=lm))
    config.variants = ml_collections.ConfigDict(
        {name: {"model": {"layer_pattern": pattern}} for name, pattern in
         LINEAR_VARIANTS.items()})
    # Speed: an untrained model the size of the LM task's (FAVOR+ defaults: 256 features,
    # chunks of 64); local layers keep a 128-key window at every length.
    config.crossover = crossover.section(
        ModelFlags(vocab_size=256, d_model=64, num_layers=4, num_heads=4, d_ff=256,
                   window=128),
        lengths=(256, 512, 1024, 2048, 4096, 8192), train_tokens=2048, decode_tokens=64,
        repeats=5, max_seconds=1.5, versus=("favor", "full"))
    return config
