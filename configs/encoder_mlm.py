"""Encoder-only (BERT-style) models: masked LM on bytes, or classification (``:cls``).

  python experiments/train.py --config=configs/encoder_mlm.py --workdir=/tmp/tx/mlm
  python experiments/train.py --config=configs/encoder_mlm.py:cls --workdir=/tmp/tx/cls

``cls`` derives from the masked-LM base in code: same encoder, a sequence-classification head,
the synthetic majority task (``tx.data.Majority``).
"""

from tx.flags import ModelFlags
from tx.data import BYTE_VOCAB_SIZE
from tx.train.configs import experiment, model_dict, model_flags


def get_config(variant: str = "mlm"):
    model = ModelFlags(task="mlm", vocab_size=BYTE_VOCAB_SIZE, d_model=128, num_layers=2,
                       num_heads=4, d_ff=512, max_len=128, norm="layernorm",
                       activation="gelu", positions="learned")
    config = experiment(model, dataset="bytes_mlm", seq_len=128, steps=300, batch_size=16,
                        learning_rate=1e-3, warmup_steps=20, eval_every=100,
                        checkpoint_every=100)
    if variant == "mlm":
        return config
    if variant == "cls":
        cls = model_flags(config.model)
        config.model = model_dict(cls, task="seq_cls", num_classes=2, vocab_size=32,
                                  max_len=64)
        config.data.name, config.data.seq_len = "classify", 64
        config.train.steps = 200
        return config
    raise ValueError(f"variant={variant!r}: use 'mlm' or 'cls', e.g. "
                     "--config=configs/encoder_mlm.py:cls")
