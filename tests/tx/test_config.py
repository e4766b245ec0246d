"""ModelConfig: presets set the independent axes; bad values name their field."""

import pytest

from kernels import masks
from tx.config import ModelConfig
from tx.layers import RopeScaling


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=12, num_kv_heads=5, d_model=96), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=8), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=0), "num_kv_heads"),
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(window=0), "window"),
    (dict(window=-3), "window"),
    (dict(attention="flash"), "attention"),
    (dict(attention="gqa+banana"), "attention"),
    (dict(cross_attention=True), "cross_attention"),
    (dict(family="encoder", task="mlm", cross_attention=True), "cross_attention"),
    (dict(family="decoder", task="mlm"), "task"),
    (dict(family="vision"), "family"),
    (dict(positions="xpos"), "positions"),
    (dict(norm="batchnorm"), "norm"),
    (dict(activation="tanh"), "activation"),
    (dict(implementation=("triton",)), "implementation"),
    (dict(layer_pattern=("local", "dilated")), "layer_pattern"),
    (dict(attention="gqa", num_heads=4, num_kv_heads=4), "num_kv_heads"),
    (dict(dropout_rate=1.5), "dropout_rate"),
    (dict(pooler="max"), "pooler"),
    (dict(attention_scale=0.0), "attention_scale"),
    (dict(head_scale=-1.0), "head_scale"),
    (dict(type_vocab_size=-1), "type_vocab_size"),
    (dict(positions="learned", rope_scaling=RopeScaling("linear", 2.0)), "rope_scaling"),
])
def test_bad_config_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        ModelConfig(**changes)


def test_head_presets_set_kv_heads():
    assert ModelConfig(attention="mha", num_heads=8, d_model=64).kv_heads == 8
    assert ModelConfig(attention="mqa", num_heads=8, d_model=64).kv_heads == 1
    assert ModelConfig(attention="gqa", num_heads=8, d_model=64).kv_heads == 4
    # An explicit count wins over the preset (the ablation flag --config.model.num_kv_heads=2).
    assert ModelConfig(attention="gqa", num_heads=8, num_kv_heads=2, d_model=64).kv_heads == 2


def test_pattern_presets_are_masks_per_family():
    cfg = ModelConfig(attention="gqa+local", window=16)
    assert cfg.layer_masks(2, causal=True) == (masks.Local(15),) * 2
    assert cfg.layer_masks(1, causal=False) == (masks.Local(8, 8),)
    assert ModelConfig(attention="sparse").layer_masks(1, causal=True) == (masks.Strided(8),)
    assert ModelConfig().layer_masks(1, causal=True) == (masks.Causal(),)
    assert ModelConfig().layer_masks(1, causal=False) == (masks.Full(),)


def test_layer_schedule_cycles():
    cfg = ModelConfig(layer_pattern="local,local,full", window=4, num_layers=6)
    assert cfg.layer_pattern == ("local", "local", "full")
    got = cfg.layer_masks(6, causal=True)
    assert got == (masks.Local(3), masks.Local(3), masks.Causal()) * 2


def test_implementation_from_comma_string():
    assert ModelConfig(implementation="cudnn,xla").implementation == ("cudnn", "xla")


@pytest.mark.parametrize("changes, field", [
    (dict(kind="ntk"), "kind"),
    (dict(factor=0.5), "factor"),
    (dict(original_max_len=0), "original_max_len"),
    (dict(kind="llama3", low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
])
def test_bad_rope_scaling_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        RopeScaling(**{"kind": "linear", "factor": 2.0, **changes})
