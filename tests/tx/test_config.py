"""Flags set the independent axes and become values; bad values name their field."""

import dataclasses

import jax
import pytest

from tx.kernels import masks
from tx import flags
from tx.config import AttentionConfig, ModelConfig
from tx.flags import ModelFlags, model_config
from tx.layers import MLPConfig, RMSNorm, RoPE, RopeScaling, T5Buckets
from tx.models import heads


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=12, num_kv_heads=5, d_model=96), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=8), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=0), "num_kv_heads"),
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(window=0), "window"),
    (dict(window=-3), "window"),
    (dict(attention="flash"), "attention"),
    (dict(attention="gqa+banana"), "attention"),
    (dict(task="vision"), "task"),
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
def test_bad_flags_name_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}[=:]"):
        ModelFlags(**changes)


@pytest.mark.parametrize("build, field", [
    (lambda: AttentionConfig(num_heads=4, num_kv_heads=3), "attention.num_kv_heads"),
    (lambda: AttentionConfig(num_heads=4, masks=("local",)), "attention.masks"),
    (lambda: AttentionConfig(num_heads=4, implementation=(3,)), "attention.implementation"),
    (lambda: T5Buckets(num_buckets=7), "positions.num_buckets"),
    (lambda: MLPConfig(0), "mlp.d_ff"),
    (lambda: RMSNorm(eps=0.0), "norm.eps"),
    (lambda: heads.Classifier(num_classes=1), "head.num_classes"),
    (lambda: dataclasses.replace(model_config(), positions="rope"), "positions"),
    (lambda: dataclasses.replace(model_config(), head=heads.MeanPool()), "head"),
])
def test_bad_values_name_field(build, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        build()


def test_head_presets_set_kv_heads():
    assert model_config(attention="mha", num_heads=8, d_model=64).kv_heads == 8
    assert model_config(attention="mqa", num_heads=8, d_model=64).kv_heads == 1
    assert model_config(attention="gqa", num_heads=8, d_model=64).kv_heads == 4
    # An explicit count wins over the preset (the ablation flag --config.model.num_kv_heads=2).
    assert model_config(attention="gqa", num_heads=8, num_kv_heads=2, d_model=64).kv_heads == 2


def test_pattern_presets_are_masks_per_head():
    assert model_config(attention="gqa+local", window=16).attention.masks == (masks.Local(15),)
    assert model_config(attention="local", window=16, task="mlm").attention.masks == \
        (masks.Local(8, 8),)
    assert model_config(attention="sparse").attention.masks == (masks.Strided(8),)
    assert model_config().attention.masks == (masks.Causal(),)
    assert model_config(task="mlm").attention.masks == (masks.Full(),)


def test_seq2seq_decoder_schedule_is_causal_encoder_bidirectional():
    cfg = model_config(task="seq2seq", attention="local", window=4)
    assert cfg.attention.masks == (masks.Local(2, 2),)
    assert cfg.head.masks == (masks.Local(3),)


def test_layer_schedule_cycles():
    cfg = model_config(layer_pattern="local,local,full", window=4, num_layers=6)
    assert cfg.attention.layer_masks(6, None) == (masks.Local(3), masks.Local(3),
                                                  masks.Causal()) * 2


def test_flags_become_values():
    cfg = model_config(positions="t5", t5_buckets=8, t5_max_distance=20, activation="swiglu",
                       d_ff=48, task="seq_cls", pooler="cls", num_classes=3)
    assert cfg.positions == T5Buckets(8, 20)
    assert cfg.mlp == MLPConfig(48, jax.nn.silu, gated=True)
    assert cfg.head == heads.Classifier(3, heads.ClsPool())
    assert isinstance(cfg.norm, RMSNorm) and cfg.norm.pre


def test_value_config_without_flags():
    """Research code builds the tree directly; nothing in it is a name."""
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2,
                      attention=AttentionConfig(num_heads=2, masks=(masks.Local(3),
                                                                    masks.Causal())),
                      positions=RoPE(), mlp=MLPConfig(32), norm=RMSNorm(), head=heads.LMHead())
    assert cfg.head_dim == 8 and cfg.kv_heads == 2


def test_implementation_from_comma_string_and_callables():
    assert ModelFlags(implementation="cudnn,xla").implementation == ("cudnn", "xla")
    fn = lambda q, k, v, **kw: q  # noqa: E731
    assert AttentionConfig(num_heads=2, implementation=fn).implementation == (fn,)


def test_registered_pattern_works_from_flags():
    flags.register_pattern("every_other", lambda f, *, causal: masks.Strided(2))
    assert model_config(layer_pattern="every_other,full").attention.masks == \
        (masks.Strided(2), masks.Causal())


@pytest.mark.parametrize("changes, field", [
    (dict(kind="ntk"), "kind"),
    (dict(factor=0.5), "factor"),
    (dict(original_max_len=0), "original_max_len"),
    (dict(kind="llama3", low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
])
def test_bad_rope_scaling_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        RopeScaling(**{"kind": "linear", "factor": 2.0, **changes})


def test_config_module_imports_nothing_from_kernels_or_layers():
    """tx.config is a leaf of the import graph: importing it loads neither package (only
    the package's own host-memory settings and the registry type, stdlib alone)."""
    import subprocess
    import sys
    code = ("import sys, tx.config; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith('tx.') and m not in ('tx.config', 'tx.registry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_registries_are_reachable_from_the_package():
    import tx
    assert tx.register_pattern is flags.register_pattern
    with pytest.raises(AttributeError, match="no_such_thing"):
        tx.no_such_thing  # noqa: B018
