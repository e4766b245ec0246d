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

``:classics`` compares the classic alternatives to BERT's and GPT's attention at (about) equal
parameters, each task with its own variants. On byte MLM: BERT-style attention, FNet (Fourier
mixing; its MLP widened by the attention's parameters), the FNet/attention hybrid (two Fourier
layers, then two attention layers), the Funnel Transformer and DeBERTa's disentangled
attention. On the byte LM: RoPE, ALiBi and Transformer-XL with a memory of one segment, each
evaluated on rows twice the training length.

  python experiments/ablate.py --config=configs/ablation.py:classics --workdir=/tmp/tx/classics

``:recurrent`` compares the gated linear recurrences (``tx.attention.recurrent``) with softmax
and FAVOR+: seven 4-layer variants (full softmax, FAVOR+, RetNet, GLA, Mamba-2, Gated DeltaNet
and the 3:1 Gated DeltaNet : full hybrid), each trained on MQAR recall and on the byte LM,
then timed against sequence length as ``:linear`` is, with the state or KV-cache bytes per
sequence, and the length where Gated DeltaNet overtakes softmax.

  python experiments/ablate.py --config=configs/ablation.py:recurrent --workdir=/tmp/tx/recurrent

``:mla`` compares K/V sharing with K/V compression at equal KV-cache bytes per token: MHA (4 K/V
heads of 16: 128 values per token and layer), GQA-2 (64), MQA (32), and multi-head latent
attention (``tx.attention.mla``) at two ranks matched to GQA and MQA: a latent of 48 plus a
16-wide RoPE key (64 values) and of 24 plus 8 (32 values). Each 4-layer variant trains on MQAR
recall and on the byte LM; the tables' KV bytes/token column shows the matched budgets.

  python experiments/ablate.py --config=configs/ablation.py:mla --workdir=/tmp/tx/mla
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
    if arg == "classics":
        return _classics()
    if arg == "recurrent":
        return _recurrent()
    if arg == "mla":
        return _mla()
    if arg is not None:
        raise ValueError(f"ablation.py:{arg}: choose 'uptrain', 'linear', 'classics', "
                         "'recurrent', 'mla' or none (the MQAR sweep).")
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


def _hybrid_tasks(*, mqar_steps: int, lm_steps: int) -> ml_collections.ConfigDict:
    """MQAR and the byte LM (128-byte rows) at 4 layers, as the linear and recurrent
    comparisons run them: a 3:1 hybrid needs 4 layers, and every variant gets them."""
    mqar = sibling(__file__, "mqar")
    mqar.train.update(steps=mqar_steps, batch_size=32)
    lm = sibling(__file__, "decoder_lm")
    lm.model.update(d_model=64, d_ff=256)
    lm.train.update(steps=lm_steps, batch_size=8)
    for task in (mqar, lm):
        task.model.num_layers = 4
        t = task.train
        t.warmup_steps = min(t.warmup_steps, t.steps // 10)
        t.eval_every = t.checkpoint_every = t.steps
        t.log_every, t.eval_batches = 10, 4
    config = ml_collections.ConfigDict()
    config.tasks = ml_collections.ConfigDict(dict(mqar=mqar, lm=lm))
    return config


def _linear():
    config = _hybrid_tasks(mqar_steps=200, lm_steps=120)
    config.tasks.lm.model.window = 32  # MQAR's window 8 is shorter than most recall distances
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


def _classics():
    mlm = sibling(__file__, "encoder_mlm")  # 128-byte rows, learned positions
    lm = sibling(__file__, "decoder_lm")  # 128-byte rows
    for task, steps in ((mlm, 400), (lm, 400)):
        task.model.update(d_model=64, d_ff=256, num_layers=4)
        t = task.train
        t.update(steps=steps, batch_size=16, warmup_steps=steps // 10)
        t.eval_every = t.checkpoint_every = t.steps
        t.log_every, t.eval_batches = 25, 4
    # FNet has no attention projections (4 d^2 per layer): its MLP takes them (d_ff + 2 d; the
    # hybrid's two FNet layers spread theirs over four MLPs: d_ff + d).
    mlm.variants = ml_collections.ConfigDict(dict(
        bert={},
        fnet={"model": dict(layer_pattern=("fnet",), d_ff=256 + 2 * 64)},
        fnet_hybrid={"model": dict(layer_pattern=("fnet", "fnet", "full", "full"),
                                   d_ff=256 + 64)},
        # Funnel: 2 layers at full length, 1 at half (mean-pooled queries), 1 upsampling
        # decoder layer: 4 layers, in HF's layout (post-norm, biases, relative attention).
        funnel={"model": dict(funnel_blocks=(2, 1), funnel_decoder_layers=1, num_layers=3,
                              positions="none", pre_norm=False, embed_norm=True,
                              attention_bias=True, mlp_bias=True, head_bias=True)},
        # DeBERTa: no absolute positions; c2p and p2c terms over 32 log buckets of distance.
        deberta={"model": dict(positions="deberta", deberta_buckets=32,
                               deberta_max_relative=128)},
    ))
    lm.data.eval_seq_len = 2 * lm.data.seq_len  # extrapolation: eval rows twice as long
    lm.data.options.contiguous = False  # XL's rows continue the previous step's
    lm.variants = ml_collections.ConfigDict(dict(
        rope={},
        alibi={"model": dict(positions="alibi")},
        # XL: relative attention with u, v and a memory of one segment, carried across steps
        # (rows continue the previous step's rows).
        xl={"model": dict(positions="xl", memory_length=128),
            "data": {"options": dict(contiguous=True)}},
    ))
    config = ml_collections.ConfigDict()
    config.tasks = ml_collections.ConfigDict(dict(mlm=mlm, lm=lm))
    return config


# Layer patterns cycled over 4 layers. Mamba-2 with expand 1 (inner width d_model): its default
# expand 2 doubles its projections, 35% more parameters than a softmax layer at d = 64.
RECURRENT_VARIANTS = {"full": dict(layer_pattern=("full",)),
                      "favor": dict(layer_pattern=("favor",)),
                      "retnet": dict(layer_pattern=("retnet",)),
                      "gla": dict(layer_pattern=("gla",)),
                      "mamba2": dict(layer_pattern=("mamba2",), ssm_expand=1),
                      "gdn": dict(layer_pattern=("gdn",)),
                      "hybrid": dict(layer_pattern=("gdn", "gdn", "gdn", "full"))}


def _recurrent():
    config = _hybrid_tasks(mqar_steps=RECURRENT_STEPS["mqar"], lm_steps=RECURRENT_STEPS["lm"])
    config.variants = ml_collections.ConfigDict(
        {name: {"model": changes} for name, changes in RECURRENT_VARIANTS.items()})
    # Speed: an untrained model the size of the LM task's; recurrences in chunks of 64.
    config.crossover = crossover.section(
        ModelFlags(vocab_size=256, d_model=64, num_layers=4, num_heads=4, d_ff=256),
        lengths=RECURRENT_LENGTHS, train_tokens=2048, decode_tokens=32, repeats=3,
        max_seconds=1.0, versus=("gdn", "full"))
    return config


# Budgets that keep the whole ablation within 10 minutes on 2 CPU cores (seven variants, two
# tasks, each compiling its own train step).
RECURRENT_STEPS = {"mqar": 150, "lm": 80}
RECURRENT_LENGTHS = (256, 1024, 4096)


# d_model 64, 4 heads of 16. Per token and layer, MHA caches 2 * 4 * 16 = 128 values, GQA-2 64,
# MQA 32; an MLA layer caches its latent plus the shared RoPE key, rank + rope_dim values, for
# every head together: mla_64 matches GQA-2's bytes and mla_32 MQA's. MLA's per-head q/k nope
# and v widths equal the softmax head_dim (16), no q compression.
_MLA = dict(layer_pattern=("mla",), mla_nope_dim=16, mla_v_dim=16, mla_q_rank=0)
MLA_VARIANTS = {"mha": dict(num_kv_heads=4),
                "gqa": dict(num_kv_heads=2),
                "mqa": dict(num_kv_heads=1),
                "mla_64": dict(_MLA, mla_kv_rank=48, mla_rope_dim=16),
                "mla_32": dict(_MLA, mla_kv_rank=24, mla_rope_dim=8)}
# Budgets that keep the whole ablation within 10 minutes on 2 CPU cores (five variants, two
# tasks, each compiling its own train step).
MLA_STEPS = {"mqar": 1200, "lm": 150}


def _mla():
    config = _hybrid_tasks(mqar_steps=MLA_STEPS["mqar"], lm_steps=MLA_STEPS["lm"])
    for task in config.tasks.values():
        task.model.update(num_heads=4, positions="rope")  # MLA rotates its RoPE key
    config.variants = ml_collections.ConfigDict(
        {name: {"model": changes} for name, changes in MLA_VARIANTS.items()})
    return config
