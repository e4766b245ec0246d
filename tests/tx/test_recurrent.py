"""Recurrent layers (``tx.attention.recurrent``: RetNet, GLA, Gated DeltaNet, Mamba-2) in
schedules: flags, training gradients, decoding from the constant-size state against the
parallel form, packing, beams, the backends' ``gated`` path and bad input.

Compiling is most of this file's time: one 4-layer model holds one layer of each kind and is
shared by the tests (module-scoped), every forward is jitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tx import flags, models
from tx.attention import calls, recurrent, recurrent_ssd, registry
from tx.flags import ModelFlags, model_config
from tx.inference import Paged, beam_search, generate, kv_cache_bytes
from tx.kernels.gated_reference import delta_recurrence, gated_recurrence

V = 64
MIXED = dict(vocab_size=V, d_model=32, num_layers=4, d_ff=64, num_heads=4, num_kv_heads=2,
             recurrent_chunk=4, layer_pattern="retnet,gla,gdn,mamba2")


@pytest.fixture(scope="module")
def mixed():
    model = models.build(model_config(**MIXED), seed=0)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 1, V)
    return model, tokens, nnx.jit(lambda m, x, **kw: m(x, **kw))


def test_flags_print_back_and_hybrid_schedules_build():
    cfg = model_config(**MIXED)
    assert [type(m) for m in cfg.attention.masks] == [
        recurrent.Retention, recurrent.GLA, recurrent.GatedDeltaNet, recurrent_ssd.Mamba2]
    printed = flags.to_flags(cfg)
    assert tuple(printed["layer_pattern"]) == ("retnet", "gla", "gdn", "mamba2")
    assert model_config(**printed) == cfg
    hybrid = model_config(**{**MIXED, "layer_pattern": "gdn,gdn,gdn,full",
                             "recurrent_conv": 3})
    assert hybrid.attention.masks[0] == recurrent.GatedDeltaNet(chunk=4, conv=3)
    assert model_config(**flags.to_flags(hybrid)) == hybrid
    # A constant-size state: the planner's bytes do not grow with the tokens.
    assert kv_cache_bytes(cfg, 2, 100) == kv_cache_bytes(cfg, 2, 10_000) > 0


def test_parallel_form_trains_and_decoding_from_the_state_equals_it(mixed):
    model, tokens, fwd = mixed
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_logits(params):
        logits = nnx.merge(graphdef, params, rest)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

    (_, full), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(params)
    # Every parameter of every recurrent layer gets a gradient.
    for i in range(4):
        layer_grads = jax.tree.leaves(grads["tower"]["blocks"][i]["self_attn"])
        assert layer_grads and all(np.all(np.isfinite(g)) and np.any(g != 0)
                                   for g in layer_grads), i
    model.init_cache(2, 11)
    try:
        outs = [fwd(model, tokens[:, :5])]  # prefill through the chunked form, then steps
        outs += [fwd(model, tokens[:, i:i + 1]) for i in range(5, 11)]
        assert model.tower.blocks[2].self_attn.cache.state[...].shape == (2, 2, 8, 8)
    finally:
        model.drop_cache()
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)


def test_packed_documents_match_each_document_alone(mixed):
    """Segment ids reset every state and keep the short convolutions within a document."""
    model, tokens, fwd = mixed
    a, b = tokens[:1, :5], tokens[1:, :6]
    packed = jnp.concatenate([a, b], axis=1)                                # [1, 11]
    seg = jnp.asarray([[0] * 5 + [1] * 6], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(6))], jnp.int32)
    out = fwd(model, packed, positions_bt=pos, segment_ids_bt=seg)
    alone = fwd(model, jnp.concatenate([jnp.pad(a, ((0, 0), (0, 1))), b], axis=0))
    np.testing.assert_allclose(out[0, :5], alone[0, :5], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(out[0, 5:], alone[1], atol=2e-5, rtol=2e-5)


def test_beams_fork_and_reorder_the_state():
    model = models.build(model_config(**{**MIXED, "num_layers": 1,
                                         "layer_pattern": "mamba2"}), seed=1)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 1, V)
    beams = beam_search(model, prompt, max_new_tokens=4, num_beams=3, length_penalty=0.0)
    full = jnp.concatenate([prompt, jnp.asarray(beams.tokens)], axis=1)
    logp = jax.nn.log_softmax(nnx.jit(lambda m, x: m(x))(model, full)[:, 4:-1])
    want = jnp.take_along_axis(logp, jnp.asarray(beams.tokens)[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(beams.scores, want, rtol=1e-4, atol=1e-4)
    state = recurrent.RecurrentState(2, 1, 2, 3, conv_width=3, conv_channels=4)
    state.state[...] = jnp.arange(12.0).reshape(2, 1, 2, 3)
    state.fork(2)
    assert state.state[...].shape == (4, 1, 2, 3) and state.conv[...].shape == (4, 2, 4)
    state.reorder(jnp.asarray([3, 0, 0, 1]))
    np.testing.assert_array_equal(state.state[...][:, 0, 0, 0], [6.0, 0.0, 0.0, 0.0])


def test_paged_cache_is_refused_by_name(mixed):
    model, tokens, _ = mixed
    with pytest.raises(ValueError, match="cache=Paged.*layer 0 is RetentionLayer"):
        generate(model, tokens[:, :4], max_new_tokens=2, cache=Paged(4))


def test_backends_serve_the_gated_path():
    """xla (chunked jnp) and pallas (the kernels) give the step recurrences, the delta rule's
    included."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((2, 9, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
    g = jnp.asarray(-rng.random((2, 9, 2)), jnp.float32)
    beta = jnp.asarray(rng.random((2, 9, 2)), jnp.float32)
    want = jax.jit(gated_recurrence)(q, k, v, g)
    for impl in (("xla",), ("pallas",)):
        with registry.recording() as records:
            got = jax.jit(lambda *a, impl=impl: registry.serve(
                "gated", calls.Gated(*a, chunk=4), impl))(q, k, v, g)
        assert records[0][1] == impl[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    want = jax.jit(delta_recurrence)(q, k, v, g, beta)
    for impl in (("xla",), ("pallas",)):
        with registry.recording() as records:
            got = jax.jit(lambda *a, impl=impl: registry.serve(
                "gated", calls.Gated(*a[:4], chunk=4, beta=a[4]), impl))(q, k, v, g, beta)
        assert records[0][1] == impl[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make,match", [
    (lambda: recurrent.Retention(gammas=(0.9, 1.5)), r"gammas=\(0.9, 1.5\).*\(0, 1\]"),
    (lambda: recurrent.Retention(gammas=(0.0,)), r"gammas=\(0.0,\)"),
    (lambda: recurrent.GLA(gate_normalizer=-16.0), "gate_normalizer=-16.0"),
    (lambda: recurrent.GatedDeltaNet(chunk=0), r"recurrent_chunk \(GatedDeltaNet.chunk\)=0"),
    (lambda: recurrent_ssd.Mamba2(conv=0), r"recurrent_conv \(Mamba2.conv\)=0"),
    (lambda: model_config(**{**MIXED, "recurrent_chunk": 0}), "recurrent_chunk"),
    (lambda: model_config(**{**MIXED, "task": "mlm"}), "'retnet' in a bidirectional"),
    (lambda: recurrent_ssd.Mamba2(groups=3).dims(model_config(**MIXED)),
     ("expand \\* d_model = 64 must split into heads of head_dim=8 whose number divides by "
      "groups=3")),
], ids=["gamma>1", "gamma=0", "normaliser<0", "chunk0", "conv0", "flag-chunk0", "encoder",
        "mamba-heads"])
def test_bad_input_is_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- Hugging Face Mamba-2 ----------------------------------------------------------------------

HF_MAMBA2 = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                 state_size=16, n_groups=2, expand=2, conv_kernel=4, chunk_size=8,
                 tie_word_embeddings=False)


def test_hf_mamba2_logits_and_greedy_tokens_match(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.tx.hf_util import TOL, hf_greedy, hf_model
    from tx.interop import hf

    ref = hf_model(transformers, torch, "Mamba2ForCausalLM", "Mamba2Config", spread=0.3,
                   **HF_MAMBA2)
    ref.save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    ids = np.random.RandomState(0).randint(3, 64, (2, 13))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    assert np.abs(np.asarray(got) - want).max() < TOL
    # Greedy decoding from the state cache (prefill of 5, then one token at a time).
    prompt = ids[:, :5]
    tokens = generate(model, jnp.asarray(prompt), max_new_tokens=8, stop_tokens=(2,)).tokens
    np.testing.assert_array_equal(tokens, hf_greedy(torch, ref, prompt, new=8, eos=2, pad=0))


@pytest.mark.parametrize("option,match", [
    ({"time_step_limit": [0.0, 1.0]}, "time_step_limit"),
    ({"use_conv_bias": False}, "use_conv_bias=False"),
    ({"num_heads": 4}, "num_heads=4"),
    ({"layer_types": ["mamba", "attention"]}, "layer_types"),
])
def test_hf_mamba2_options_tx_lacks_are_refused(option, match):
    from tx.interop import hf
    config = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], **HF_MAMBA2}
    hf.config_from_hf(config)  # the plain config maps
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf({**config, **option})


def test_training_a_recurrent_model_resumes_exactly(tmp_path):
    """A recurrent run that loses its last checkpoint resumes from the one before and
    gives the uninterrupted run's losses bit for bit (the layers' parameters, including the
    decay's and the convolutions', travel in the checkpoint like any other)."""
    import shutil
    from tx.train import configs as configs_lib
    from tx.train import loop
    from tx.train.metrics import read_jsonl
    model = ModelFlags(task="lm", **{**MIXED, "vocab_size": 264, "num_layers": 2,
                                     "layer_pattern": "gdn,mamba2"})
    config = configs_lib.experiment(model, dataset="bytes", seq_len=16, steps=4, batch_size=2,
                                    warmup_steps=1, log_every=1, eval_batches=1, eval_every=4,
                                    checkpoint_every=2, async_checkpoints=False,
                                    options={"max_bytes": 50_000, "eval_fraction": 0.5})
    losses = lambda: [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]  # noqa: E731
    loop.run(config, tmp_path, print_fn=None)
    first = losses()
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    lines = []
    loop.run(config, tmp_path, print_fn=lines.append)
    assert any(line.startswith("resuming from step 2") for line in lines)
    assert losses() == first and len(first) == 4 and first[-1] < first[0]
