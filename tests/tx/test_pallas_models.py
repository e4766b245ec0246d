"""With implementation=('pallas',) every model family trains and matches the xla path.

No fallback is allowed here ('pallas' alone), so a case the kernel silently declined would
fail instead of passing on the reference. On CPU the kernel runs in interpret mode.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tx import models
from tx.flags import model_config
from tx.train import init_state, make_train_step

B, T, V = 2, 20, 40


def _batch(seq2seq):
    rng = np.random.default_rng(0)
    toks = lambda: jnp.asarray(rng.integers(8, V, (B, T)), jnp.int32)  # noqa: E731
    batch = {"inputs": toks(), "targets": toks(), "weights": jnp.ones((B, T), jnp.float32),
             "lengths": jnp.array([T, T - 7], jnp.int32)}
    if seq2seq:
        batch.update(source=toks(), source_lengths=jnp.array([T, 9], jnp.int32))
    return batch


def _losses(cfg, steps=3):
    optimizer = optax.adam(1e-2)
    state = init_state(models.build(cfg), optimizer)
    step = make_train_step(state.graphdef, optimizer)
    params, rest, opt_state = state.params, state.rest, state.opt_state
    batch, out = _batch("source" in cfg.head.batch_keys), []
    for _ in range(steps):
        params, rest, opt_state, metrics = step(params, rest, opt_state, batch)
        out.append(float(metrics["loss_sum"] / metrics["count"]))
    return out


@pytest.mark.parametrize("task, attention, extra", [
    ("lm", "gqa+local", {}),
    ("lm", "mqa+sparse", {}),
    ("mlm", "gqa+bigbird", {}),
    ("seq2seq", "gqa", {}),
    # FNet beside attention: the Fourier layer needs no backend, the attention layer pallas.
    ("mlm", "gqa", dict(layer_pattern=("fnet", "full"), num_layers=2)),
])
def test_pallas_trains_like_xla(task, attention, extra):
    base = dict(task=task, vocab_size=V, d_model=32, num_heads=4, num_layers=1,
                d_ff=64, window=6, stride=4, sparse_block=4, attention=attention,
                positions="rope")
    base.update(extra)
    pallas = _losses(model_config(**base, implementation=("pallas",)))
    xla = _losses(model_config(**base, implementation=("xla",)))
    assert pallas[-1] < pallas[0]  # it trains
    np.testing.assert_allclose(pallas, xla, rtol=2e-4, atol=2e-4)


# --- score modifiers: T5 buckets, ALiBi and Gemma-2 soft-capping inside the kernels -----------

SCORE_MOD_MODELS = {
    "t5": dict(task="seq2seq", attention="gqa", positions="t5", t5_buckets=8,
               t5_max_distance=20),
    "alibi": dict(task="lm", attention="gqa+local", positions="alibi"),
    "gemma2": dict(task="lm", attention="gqa", layer_pattern=("local", "causal"),
                   num_layers=2, positions="rope", attention_softcap=2.0, final_softcap=3.0,
                   sandwich_norm=True, norm_unit_offset=True, embed_scale=32 ** 0.5,
                   activation="geglu", attention_sinks=True),
    # Gemma 3's shape: q/k RMSNorm per head, a RoPE base per layer (local 10k, global 1M).
    "gemma3": dict(task="lm", attention="gqa", layer_pattern=("local", "causal"),
                   num_layers=2, positions="layer_rope", rope_bases=(1e4, 1e6),
                   attention_qk_norm=True),
}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Pallas kernels the registry hands work to (flash and paged), by kind of
    score modifier; a case the kernels declined would raise, since 'pallas' stands alone."""
    from tx.attention import registry
    calls = {"flash": [], "paged": []}

    backend = registry._BACKENDS["pallas"]

    def counting(kind, fn):
        def call(record):
            calls[kind].append(type(record.score_mod).__name__)
            return fn(record)
        return call

    monkeypatch.setattr(backend, "dense", counting("flash", backend.dense))
    monkeypatch.setattr(backend, "paged", counting("paged", backend.paged))
    return calls


def _model_config(name, implementation):
    base = dict(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, num_layers=1, d_ff=64,
                window=6)
    return model_config(**{**base, **SCORE_MOD_MODELS[name]}, implementation=implementation)


@pytest.mark.parametrize("name", list(SCORE_MOD_MODELS))
def test_score_mod_models_train_and_decode_on_pallas_alone(name, kernel_calls):
    from tx.inference import Paged, generate
    pallas_cfg, xla_cfg = (_model_config(name, impl) for impl in (("pallas",), ("xla",)))
    pallas = _losses(pallas_cfg)
    assert pallas[-1] < pallas[0]
    wanted = {"t5": {"T5Bias"}, "alibi": {"ALiBi"}, "gemma2": {"Chain"},
              "gemma3": {"NoneType"}}[name]
    assert wanted <= set(kernel_calls["flash"]), kernel_calls
    kernel_calls["flash"].clear()
    xla = _losses(xla_cfg)
    assert not kernel_calls["flash"]  # the xla run never touched the kernel
    np.testing.assert_allclose(pallas, xla, rtol=2e-4, atol=2e-4)

    # Greedy decoding through the paged cache: prefill and steps in the paged kernel.
    seq2seq = name == "t5"
    rng = np.random.default_rng(3)
    prompt = jnp.asarray(rng.integers(8, V, (B, 1 if seq2seq else 9)), jnp.int32)
    extra = {"source_bs": jnp.asarray(rng.integers(8, V, (B, 11)), jnp.int32)} if seq2seq \
        else {}
    tokens = []
    for cfg in (pallas_cfg, xla_cfg):
        model = models.build(cfg)
        tokens.append(generate(model, prompt, max_new_tokens=8, cache=Paged(4), **extra).tokens)
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert wanted <= set(kernel_calls["paged"]), kernel_calls
