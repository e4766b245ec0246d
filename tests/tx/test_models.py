"""Every architecture x pattern x heads runs; causality; incremental decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx import models
from tx.flags import model_config
from tx.models import heads as heads_lib
from tx.train import loss_fn

V, B, T = 64, 2, 12
ARCHS = {"decoder": "lm", "encoder": "mlm", "encoder_decoder": "seq2seq"}
PATTERNS = ("full", "local", "sparse", "strided", "bigbird", "global")
HEADS = ("mha", "gqa", "mqa")


def _config(arch="decoder", **changes):
    base = dict(task=ARCHS[arch], vocab_size=V, d_model=32, num_heads=4, num_layers=1,
                d_ff=64, window=4, stride=3, sparse_block=4, max_len=32)
    return model_config(**{**base, **changes})


def _tokens(seed, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 8, V, dtype=jnp.int32)


def _batch(cfg):
    toks = _tokens(0)
    batch = {"inputs": toks, "targets": _tokens(1), "weights": jnp.ones((B, T), jnp.float32),
             "lengths": jnp.array([T, T - 3], jnp.int32)}
    if "source" in cfg.head.batch_keys:
        batch.update(source=_tokens(2, (B, T + 3)), source_lengths=jnp.array([T + 3, 5]))
    if "labels" in cfg.head.batch_keys:
        batch["labels"] = jnp.array([0, 1], jnp.int32)
    if isinstance(cfg.head, heads_lib.TokenClassifier):
        batch["targets"] = batch["targets"] % cfg.head.num_classes
    return batch


@functools.cache
def _value_and_grad(cfg):
    model = models.build(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest, batch):
        return jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest, copy=True), batch)[0])(params)

    return run, params, rest


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_every_variant(arch, heads, dtype):
    """One compile per (architecture, heads, dtype): the per-layer schedule puts every
    pattern in its own layer, so each pattern runs forward and backward."""
    cfg = _config(arch, attention=heads, dtype=dtype, layer_pattern=PATTERNS,
                  num_layers=len(PATTERNS))
    # 'sparse' is 'strided' when causal and 'bigbird' when not: five distinct masks.
    masks = cfg.head.masks if arch == "encoder_decoder" else cfg.attention.masks
    assert len(set(masks)) == 5
    run, params, rest = _value_and_grad(cfg)
    loss, grads = run(params, rest, _batch(cfg))
    assert np.isfinite(float(loss)) and 2.0 < float(loss) < 10.0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) >= len(leaves) - 1


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_encoder_classification_heads(task):
    cfg = _config("encoder", task=task, num_classes=3, attention="gqa+local")
    run, params, rest = _value_and_grad(cfg)
    loss, grads = run(params, rest, _batch(cfg))
    assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(g).all())
                                            for g in jax.tree.leaves(grads))


def _logits(model, cfg, toks, source=None):
    if isinstance(cfg.head, heads_lib.Seq2SeqLM):
        return model(source, toks)
    return model(toks)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_future_tokens_do_not_leak(arch, pattern):
    cfg = _config(arch, attention=pattern, num_layers=2)
    model = models.build(cfg)
    toks, source = _tokens(0), _tokens(2, (B, 9))
    cut = 7
    perturbed = toks.at[:, cut:].set(_tokens(5)[:, cut:])
    a = _logits(model, cfg, toks, source)[:, :cut]
    b = _logits(model, cfg, perturbed, source)[:, :cut]
    np.testing.assert_array_equal(a, b)  # bit-identical, not merely close


@pytest.mark.parametrize("pattern", ["local", "sparse", "bigbird", "global"])
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_invisible_positions_do_not_matter(arch, pattern):
    """One layer: changing the token at an invisible key leaves a query's output unchanged
    (bit for bit), and changing a visible one changes it (so the check can fail)."""
    cfg = _config(arch, attention=pattern, positions="learned", window=3, sparse_block=2)
    model = models.build(cfg)
    (mask,) = cfg.attention.masks
    dense = mask.dense(T, T)
    toks = _tokens(0, (1, T))
    # Row j of the batch has the token at position j changed; the last row is unchanged
    # (same batch, so the same kernels: bit-identity is a fair demand).
    changed = jnp.where(jnp.eye(T, dtype=bool), (toks + 1 - 8) % (V - 8) + 8, toks)
    out = model(jnp.concatenate([changed, toks]))
    base = out[T]
    hidden = 0
    for j in range(T):
        for i in range(T):
            if i == j:
                continue
            if dense[i, j]:
                assert not np.array_equal(out[j, i], base[i]), (i, j)
            else:
                np.testing.assert_array_equal(out[j, i], base[i])
                hidden += 1
    assert hidden > 0


@pytest.mark.parametrize("attention, positions, layer_pattern", [
    ("mha+full", "rope", ()), ("gqa+local", "t5", ()), ("mqa+sparse", "alibi", ()),
    ("bigbird", "learned", ()), ("gqa+global", "sinusoidal", ()),
    ("gqa", "rope", ("local", "local", "full")),
])
@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_incremental_decoding_matches_full_forward(arch, attention, positions, layer_pattern):
    cfg = _config(arch, attention=attention, positions=positions, window=3,
                  layer_pattern=layer_pattern, num_layers=max(2, len(layer_pattern)))
    model = models.build(cfg)
    toks, source = _tokens(0), _tokens(2, (B, 9))
    full = _logits(model, cfg, toks, source)
    model.init_cache(B, T)
    if arch == "decoder":
        steps = [model(toks[:, :5])] + [model(toks[:, i:i + 1]) for i in range(5, T)]
    else:
        encoded = model.encode(source)
        steps = [model.decode(toks[:, :5], encoded)]
        steps += [model.decode(toks[:, i:i + 1], encoded) for i in range(5, T)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=2e-5)


def test_packed_documents_do_not_attend_across():
    cfg = _config("decoder", attention="gqa")
    model = models.build(cfg)
    toks = _tokens(0)
    seg = jnp.array([[1] * 5 + [2] * 7] * B, jnp.int32)
    pos = jnp.array([list(range(5)) + list(range(7))] * B, jnp.int32)
    packed = model(toks, segment_ids_bt=seg, positions_bt=pos)
    alone = model(toks[:, 5:])  # the second document on its own
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5, rtol=1e-5)


def test_every_parameter_has_logical_axes():
    for arch in ARCHS:
        model = models.build(_config(arch, attention="gqa", positions="t5", tie_embeddings=False))
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        for path, spec in jax.tree_util.tree_leaves_with_path(
                specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
            assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0, path


@pytest.mark.parametrize("vocab", [1, 2, 7, 300])
def test_correct_metric_is_argmax_equals_label_ties_and_bad_labels_included(vocab):
    """``correct`` avoids argmax (slow on XLA's CPU backend) and must still mean it: ties go
    to the first index, labels outside the vocabulary (padding -1, say) are never correct."""
    rng = np.random.RandomState(vocab)
    logits = jnp.asarray(rng.randint(0, 3, (3, 41, vocab)).astype(np.float32))  # many ties
    labels = jnp.asarray(rng.randint(-2, vocab + 2, (3, 41)))
    want = np.asarray(logits).argmax(-1) == np.asarray(labels)
    np.testing.assert_array_equal(heads_lib.argmax_is(logits, labels), want.astype(np.float32))
    weights = jnp.asarray(rng.randint(0, 2, (3, 41)))
    _, metrics = heads_lib.token_loss(logits, jnp.clip(labels, 0, vocab - 1), weights)
    hits = np.asarray(logits).argmax(-1) == np.clip(np.asarray(labels), 0, vocab - 1)
    assert float(metrics["correct"]) == float((hits * np.asarray(weights)).sum())
    _, metrics = heads_lib.class_loss(logits[:, 0], jnp.clip(labels[:, 0], 0, vocab - 1))
    assert float(metrics["correct"]) == float(hits[:, 0].sum())


@pytest.mark.parametrize("attention, positions", [("local", "alibi"), ("gqa", "t5"),
                                                  ("gqa+local", "rope"), ("", "alibi")])
def test_pallas_alone_decodes_a_contiguous_or_rolling_cache(attention, positions):
    """('pallas',) alone: the flash kernel for the full forward, the paged kernel over the
    cache (a rolling one for the window, read in time order) for the steps; both match xla."""
    kw = dict(attention=attention, positions=positions, window=3)
    pallas = models.build(_config("decoder", implementation=("pallas",), **kw))
    toks = _tokens(0)
    want = models.build(_config("decoder", implementation=("xla",), **kw))(toks)
    np.testing.assert_allclose(pallas(toks), want, atol=2e-5, rtol=2e-5)
    pallas.init_cache(B, T)
    steps = [pallas(toks[:, :5])] + [pallas(toks[:, i:i + 1]) for i in range(5, T)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), want, atol=2e-5, rtol=2e-5)
