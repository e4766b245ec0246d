"""Funnel Transformer (``tx.models.funnel``, ``tx.attention.funnel``): HF ``FunnelModel`` /
``FunnelForMaskedLM`` parity on padded batches (fp32, 1e-4) for both HF attention types and the
pooling options, the flag spelling and its round trip, training through the MLM loss on every
CPU backend, the reported per-block lengths, and refusals by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx import flags, models
from tx.attention import funnel as fa
from tx.attention import registry
from tx.flags import model_config
from tx.models.funnel import Funnel

# The flags of a Funnel MLM model (HF's layout: post-norm, biases, no positions of its own).
FUNNEL = dict(task="mlm", vocab_size=61, d_model=32, num_layers=4, num_heads=4, d_ff=64,
              positions="none", norm="layernorm", pre_norm=False, embed_norm=True,
              attention_bias=True, mlp_bias=True, head_bias=True, funnel_blocks="2,2",
              funnel_decoder_layers=1)

VOCAB, T = 97, 16
# Three blocks: two poolings (16 -> 8 -> 4) and a stride-4 upsampling.
HF_BASE = dict(vocab_size=VOCAB, d_model=32, n_head=4, d_head=8, d_inner=64,
               block_sizes=[1, 2, 1], num_decoder_layers=1, hidden_dropout=0.0,
               attention_dropout=0.0, activation_dropout=0.0)
# HF's default options, its other attention form, and the other pooling options together.
HF_VARIANTS = {"default": {}, "factorized": dict(attention_type="factorized"),
               "no_cls_pool_kv_max": dict(separate_cls=False, pool_q_only=False,
                                          pooling_type="max")}


# -- geometry -----------------------------------------------------------------------------------
def test_pool_and_upsample_geometry():
    x = jnp.arange(8, dtype=jnp.float32)[None, :, None]  # rows 0..7
    pooled = fa.pool_hidden(x, True, "mean")  # [CLS], then (1, 2), (3, 4), (5, 6); 7 dropped
    np.testing.assert_allclose(np.asarray(pooled[0, :, 0]), [0, 1.5, 3.5, 5.5])
    np.testing.assert_allclose(np.asarray(fa.pool_hidden(x, False, "max")[0, :, 0]), [1, 3, 5, 7])
    np.testing.assert_array_equal(fa.pool_index(8, True), [0, 1, 3, 5])
    up = fa.upsample(pooled, 8, 2, True)  # back over the rows each covers; the tail is zero
    np.testing.assert_allclose(np.asarray(up[0, :, 0]), [0, 1.5, 1.5, 3.5, 3.5, 5.5, 5.5, 0])
    lengths = jnp.asarray([8, 7, 4, 1, 0])
    np.testing.assert_array_equal(np.asarray(fa.pool_lengths(lengths, True)), [4, 4, 2, 1, 0])
    np.testing.assert_array_equal(np.asarray(fa.pool_lengths(lengths, False)), [4, 3, 2, 0, 0])


# -- HF parity ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pairs(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.set_num_threads(1)
    from tests.tx.hf_util import hf_model, save
    from tx.interop import hf
    out = {}
    for name, options in HF_VARIANTS.items():
        ref = hf_model(transformers, torch, "FunnelForMaskedLM", "FunnelConfig", spread=0.2,
                       **{**HF_BASE, **options})
        out[name] = (ref, hf.load(save(tmp_path_factory, f"funnel_{name}", ref)))
    return torch, transformers, out


def _batch():
    from tests.tx.hf_util import padded_batch
    ids, valid, lengths = padded_batch(VOCAB, t=T, lengths=(16, 9, 4))
    types = np.broadcast_to(np.where(np.arange(T) < 6, 0, 1), ids.shape).copy()
    types[:, 0] = 2  # [CLS]: the same segment as every token
    return ids, valid, lengths, types


def _hf(torch, ref, ids, valid, types):
    kw = dict(attention_mask=torch.tensor(valid.astype(np.int64)))
    if types is not None:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return (ref(torch.tensor(ids), **kw).logits.numpy(),
                ref.funnel(torch.tensor(ids), **kw).last_hidden_state.numpy())


_COMPILED = {}


def _tx(model, ids, lengths, types=None):
    """``(hidden, logits)`` of a tx Funnel MLM model, jitted once per model (one compile is
    faster here than compiling each eager op); types default to zeros, as HF's do."""
    if id(model) not in _COMPILED:
        graph, state = nnx.split(model)

        def forward(state, ids_bt, lengths_b, types_bt):
            m = nnx.merge(graph, state)
            hidden = m.encoder(ids_bt, lengths_b=lengths_b, token_types_bt=types_bt)
            return hidden, m.head(hidden)
        _COMPILED[id(model)] = (model, state, jax.jit(forward))
    _, state, forward = _COMPILED[id(model)]
    types = np.zeros_like(ids) if types is None else types
    out = forward(state, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32),
                  jnp.asarray(types, jnp.int32))
    return tuple(map(np.asarray, out))


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_parity_on_padded_batch(hf_pairs, variant):
    from tests.tx.hf_util import TOL
    torch, _, pairs = hf_pairs
    ref, model = pairs[variant]
    ids, valid, lengths, types = _batch()
    outs = []
    for tt in (None, types):
        want_logits, want_hidden = _hf(torch, ref, ids, valid, tt)
        got_hidden, got_logits = _tx(model, ids, lengths, tt)  # FunnelModel, ...ForMaskedLM
        assert np.abs(got_hidden - want_hidden).max() <= TOL
        assert np.abs(got_logits - want_logits).max() <= TOL
        outs.append(want_logits)
    # The token-type term and the padding are exercised (not vacuous):
    assert np.abs(outs[0] - outs[1]).max() > 1e-2
    unmasked, _ = _hf(torch, ref, ids, np.ones_like(valid), None)
    assert np.abs(unmasked[1:] - outs[0][1:]).max() > 1e-2


def test_hf_round_trip_to_transformers(hf_pairs, tmp_path):
    from tests.tx.hf_util import TOL
    from tx.interop import hf
    torch, transformers, pairs = hf_pairs
    _, model = pairs["default"]
    assert hf.model_type_of(model.config) == "funnel"
    hf.save(model, tmp_path)
    ref = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == "FunnelForMaskedLM"
    ids, valid, lengths, _ = _batch()
    got = _tx(model, ids, lengths)[1]
    assert np.abs(got - _hf(torch, ref, ids, valid, None)[0]).max() <= TOL


@pytest.mark.parametrize("option,value", [("block_repeats", [1, 2]), ("truncate_seq", False),
                                          ("hidden_act", "swish")])
def test_hf_options_not_implemented_are_refused_by_name(option, value):
    from tx.interop import hf
    cfg = dict(HF_BASE, model_type="funnel", architectures=["FunnelForMaskedLM"])
    cfg[option] = value
    with pytest.raises(ValueError, match=option):
        hf.config_from_hf(cfg)


# -- flags, training, reporting -----------------------------------------------------------------
def test_flags_round_trip_and_value():
    cfg = model_config(**FUNNEL)
    assert cfg.head.body == Funnel((2, 2), decoder_layers=1)
    printed = flags.to_flags(cfg)
    assert printed["funnel_blocks"] == (2, 2) and printed["funnel_decoder_layers"] == 1
    assert model_config(**printed) == cfg
    other = model_config(**dict(FUNNEL, funnel_pooling="max", funnel_separate_cls=False,
                                funnel_pool_q_only=False))
    assert model_config(**flags.to_flags(other)) == other
    bert = model_config(**dict(FUNNEL, funnel_blocks="", funnel_decoder_layers=2))
    assert bert.head.body is None  # the BERT-style tower


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config(**FUNNEL)
    rng = np.random.RandomState(1)
    batch = {"inputs": jnp.asarray(rng.randint(1, 61, (2, 16)), jnp.int32),
             "targets": jnp.asarray(rng.randint(1, 61, (2, 16)), jnp.int32),
             "weights": jnp.asarray(rng.rand(2, 16) < 0.5, jnp.float32),
             "lengths": jnp.asarray([16, 9], jnp.int32)}
    return cfg, batch


def test_trains_through_the_mlm_loss(tiny):
    cfg, batch = tiny
    model = models.build(cfg, seed=0)
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return cfg.head.loss(nnx.merge(graph, p, rest), batch)[0]

    step = jax.jit(jax.value_and_grad(loss))
    first, grads = step(params)
    # Funnel's own parameters learn (the position and token-type terms are in the graph).
    attn = grads["encoder"]["blocks"][1][0]["self_attn"]
    for name in ("position_dnh", "segment_snh", "content_bias_nh"):
        assert float(jnp.abs(attn[name][...]).max()) > 0, name
    for _ in range(5):
        params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
        later, grads = step(params)
    assert np.isfinite(float(later)) and float(later) < float(first)


def test_every_cpu_backend_serves_and_agrees_and_reports_lengths(tiny):
    """The HF parity tests run the device's order (the fused cpu kernel here); the xla
    reference and the Pallas kernel (interpret mode) serve the same augmented calls."""
    cfg, batch = tiny
    ids, lengths = batch["inputs"], batch["lengths"]
    report = registry.explain(models.build(cfg, seed=0), batch)
    assert report["attention"] == {registry.defaults()[0]: 5}  # 2 + 2 encoder, 1 decoder
    outs = []
    for impl in ("xla", "pallas"):
        model = models.build(model_config(**dict(FUNNEL, implementation=impl)), seed=0)
        assert registry.explain(model, batch)["attention"] == {impl: 5}
        graph, state = nnx.split(model)  # one compile, not one per eager op
        forward = jax.jit(lambda st, graph=graph: nnx.merge(graph, st)(ids, lengths_b=lengths))
        outs.append(np.asarray(forward(state)))
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4
    assert report["attention shapes"] == {
        "block 0: 16 queries x 16 keys": 2, "block 1: 8 queries x 16 keys": 1,
        "block 1: 8 queries x 8 keys": 1, "decoder: 16 queries x 16 keys": 1}


def test_print_config_reports_the_block_lengths():
    from tx.train import configs, describe
    model = flags.ModelFlags(**dict(FUNNEL, vocab_size=264))  # the byte vocabulary
    config = configs.experiment(model, dataset="bytes_mlm", seq_len=32)
    text = describe.render(config)
    assert "block 1: 16 queries x 32 keys (1 layer)" in text
    assert "funnel_blocks" in text  # the field is listed with its doc


# -- refusals -----------------------------------------------------------------------------------
def test_a_length_the_pooling_does_not_divide_is_refused_by_name():
    model = models.build(model_config(**dict(FUNNEL, funnel_blocks="1,2,1")), seed=0)
    with pytest.raises(ValueError, match="funnel_blocks.*multiple of 4"):
        model(jnp.ones((1, 10), jnp.int32))  # two poolings: 10 -> 5 -> not a half
    with pytest.raises(ValueError, match="funnel_blocks"):
        model(jnp.ones((1, 4), jnp.int32))  # 4 -> 2 -> 1: nothing left to pool


def test_a_data_length_the_pooling_does_not_divide_is_refused_before_training():
    from tx.train import configs
    model = flags.ModelFlags(**dict(FUNNEL, vocab_size=264))
    with pytest.raises(configs.ConfigError, match="config.data.seq_len=31: Funnel"):
        configs.resolve(configs.experiment(model, dataset="bytes_mlm", seq_len=31))
    config = configs.experiment(model, dataset="bytes_mlm", seq_len=32)
    config.data.eval_seq_len = 33
    with pytest.raises(configs.ConfigError, match="config.data.eval_seq_len=33: Funnel"):
        configs.resolve(config)


@pytest.mark.parametrize("change,name", [
    (dict(num_layers=3), "num_layers"), (dict(positions="rope"), "positions"),
    (dict(pre_norm=True), "norm"), (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(layer_pattern="local"), "attention.masks"),
    (dict(type_vocab_size=2), "embed")])
def test_options_funnel_does_not_combine_with_are_refused_by_name(change, name):
    with pytest.raises(ValueError, match=name):
        models.build(model_config(**dict(FUNNEL, **change)))


def test_bad_values_and_packing_are_refused_by_name():
    with pytest.raises(ValueError, match="funnel_blocks"):
        model_config(**dict(FUNNEL, funnel_blocks="2,x"))
    with pytest.raises(ValueError, match="funnel_pooling"):
        model_config(**dict(FUNNEL, funnel_pooling="min"))
    with pytest.raises(ValueError, match="funnel.blocks"):
        Funnel(blocks=(2, 0))
    model = models.build(model_config(**FUNNEL), seed=0)
    with pytest.raises(ValueError, match="segment_ids"):
        model(jnp.ones((1, 8), jnp.int32), segment_ids_bt=jnp.ones((1, 8), jnp.int32))


def test_funnel_fields_outside_a_funnel_mlm_are_refused_by_name():
    with pytest.raises(ValueError, match="funnel_blocks.*task='seq_cls'"):
        model_config(**dict(FUNNEL, task="seq_cls"))
    with pytest.raises(ValueError, match="funnel_pooling.*without funnel_blocks"):
        model_config(**dict(FUNNEL, funnel_blocks="", funnel_decoder_layers=2,
                            funnel_pooling="max"))


def test_the_planner_reports_the_block_lengths():
    """``tx-kv-memory`` plans no cache for an encoder; for Funnel it reports the shortened
    lengths (``tx.inference.memory.attention_shapes``) instead."""
    from tx.inference import memory
    cfg = model_config(**FUNNEL)
    shapes = memory.attention_shapes(cfg, 32)
    assert shapes == {"block 0: 32 queries x 32 keys": 2, "block 1: 16 queries x 32 keys": 1,
                      "block 1: 16 queries x 16 keys": 1, "decoder: 32 queries x 32 keys": 1}
    bert = model_config(task="mlm", vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                        d_ff=64)
    assert memory.attention_shapes(bert, 32) is None
