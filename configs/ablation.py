"""The default ablation: a small decoder on MQAR comparing mha, mqa, gqa, local and sparse.

Every variant trains from the same seed on the same data order; only ``sweep.field`` changes.
The local window (8 keys) is shorter than most key-query distances, so local attention should
fail the recall that full attention solves.

  python experiments/ablate.py --config=configs/ablation.py --workdir=/tmp/tx/ablation
  python experiments/ablate.py --config=configs/ablation.py \
      --config.sweep.field=model.num_layers --config.sweep.choices=1,2,4
"""

import ml_collections

from tx.train.configs import sibling


def get_config():
    config = sibling(__file__, "mqar")
    config.sweep = ml_collections.ConfigDict(dict(
        field="model.attention",  # any dotted field of this config
        choices="mha,mqa,gqa,local,sparse",  # comma-separated, parsed as the field's type
    ))
    return config
