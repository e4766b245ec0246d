"""tx against Hugging Face ``transformers`` (PyTorch, eager) on the same weights, one process.

For a GPT-2, a LLaMA (GQA, SwiGLU, RoPE), a Mamba-2 (SSD recurrence, no attention) and a
DeepSeek-V3 (dense: multi-head latent attention, ``tx.attention.mla``) shape it builds a random ``transformers`` model, moves its weights into tx with ``tx.interop.hf`` and
times, alternating tx and PyTorch repetition by repetition (so a loaded machine slows both
alike; medians reported):

  * forward: logits ``[B, T, V]`` of a ``B x T`` batch;
  * train: one AdamW step (forward, token cross-entropy, backward, update). tx runs
    ``tx.train.make_train_step`` with plain ``optax.adamw`` (no clipping, no non-finite
    guard); PyTorch runs ``torch.optim.AdamW`` with the same hyperparameters;
  * attention: one layer's causal attention alone, forward and backward, on the model's
    heads and the ``B x T`` batch, against PyTorch's ``scaled_dot_product_attention`` (a
    fused flash kernel on CPU; DeepSeek-V3: MLA's expanded form, q/k head dim
    ``dn + dr`` and v head dim ``dv`` apart): tx's default implementations (what the layer runs: the fused
    ``cpu`` kernel, ``kernels/cpu_attention.cc``) and, as ``attention_xla``, the ``xla``
    reference alone;
  * decode: greedy generation of ``--new_tokens`` after a ``--prompt``-token prompt at each
    ``--decode_batches`` size (tx ``generate`` with the contiguous cache, HF ``generate``),
    and tx's paged cache against its contiguous one. tx decodes MLA in the absorbed form from
    its latent cache; ``transformers`` caches the latent too but expands it to per-head K/V
    for the whole prefix at every step.

Mamba-2 has no attention or paged rows (its cache is a constant-size state). Without the CUDA
package ``mamba_ssm`` (any CPU user) ``transformers`` runs its PyTorch reference path
(``torch_forward``: chunked SSD in torch ops, one recurrence step per decoded token); its rows
say which path was timed (``torch_path``). On a loaded 2-core machine PyTorch's default two
threads can spin against each other in decode (measured: 30 s instead of 0.4 s for 128 tokens):
compare with ``--torch_threads=1`` there.

Before timing it checks that the two agree: max abs logit difference <= 1e-4 (fp32) and
identical greedy tokens (tx contiguous, tx paged and HF). Prints a table and one JSON line
per row.

  python experiments/bench_vs_hf.py                       # the README table
  python experiments/bench_vs_hf.py --models=llama --work=forward,train
  python experiments/bench_vs_hf.py --models=mamba2 --decode_batches=1 --torch_threads=1
  python experiments/bench_vs_hf.py --models=deepseek_v3 --decode_batches=1
"""

from __future__ import annotations

import tx.experiments  # noqa: F401  (keeps freed host memory for XLA: experiments/__init__.py)
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from tx.attention import registry as attention_registry
from tx.inference import Contiguous, Paged, generate
from tx.interop import hf
from tx.train.step import init_state, make_train_step

_MODELS = flags.DEFINE_list("models", ["gpt2", "llama", "mamba2"],
                            "Model shapes: gpt2, llama, mamba2, "
                            "deepseek_v3.")
_WORK = flags.DEFINE_list("work", ["forward", "train", "attention", "decode"], "What to time.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width D.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Layers.")
_VOCAB = flags.DEFINE_integer("vocab", 2048, "Vocabulary V.")
_BATCH = flags.DEFINE_integer("batch", 8, "Forward / train batch B.")
_SEQ = flags.DEFINE_integer("seq", 256, "Forward / train length T.")
_PROMPT = flags.DEFINE_integer("prompt", 32, "Decode prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8"], "Decode batch sizes.")
_PAGE = flags.DEFINE_integer("page_size", 16, "Paged cache page size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions per side (median).")
_LR = flags.DEFINE_float("learning_rate", 1e-4, "AdamW learning rate (both sides).")
_TOL = flags.DEFINE_float("tol", 1e-4, "Max abs fp32 logit difference allowed.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch threads (0: its default, "
                                      "one per core).")
_PAUSE = flags.DEFINE_float("pause", 0.1, "Seconds of idle between timed calls, so that one "
                            "side's spinning worker threads have gone quiet before the other "
                            "runs.")

_WEIGHT_DECAY = 0.01
_SPREAD = 0.05  # weights N(0, spread): HF's 0.02 init makes small models repeat one token


def _shapes(name: str, d: int, layers: int, vocab: int, max_len: int) -> tuple[str, str, dict]:
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    if name == "gpt2":
        return "GPT2LMHeadModel", "GPT2Config", dict(
            n_embd=d, n_layer=layers, n_head=max(1, d // 64), n_positions=max_len,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
            **common)
    if name == "llama":
        heads = max(8, d // 32)  # GQA 4:1 at every width (8:2 at d=256)
        return "LlamaForCausalLM", "LlamaConfig", dict(
            hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads // 4, intermediate_size=(d * 8 // 3 + 15) // 16 * 16,
            max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
            **common)
    if name == "mamba2":
        # SSD mixer, no attention: heads of 64 channels over the 2x inner width. Without the
        # CUDA package ``mamba_ssm`` (any CPU user), transformers runs its reference
        # ``torch_forward``: chunked SSD in PyTorch ops, one recurrence step per decoded token.
        return "Mamba2ForCausalLM", "Mamba2Config", dict(
            hidden_size=d, num_hidden_layers=layers, num_heads=2 * d // 64, head_dim=64,
            state_size=64, n_groups=1, expand=2, conv_kernel=4, chunk_size=64,
            layer_norm_epsilon=1e-5, tie_word_embeddings=False, **common)
    if name == "deepseek_v3":
        # Every layer dense (first_k_dense_replace = layers): DeepSeek-V3's MLA proportions
        # at width d (V3: d 7168, 128 heads of nope 128 + rope 64, v 128, kv rank 512 = 4
        # heads' worth, q rank 1536), SwiGLU as LLaMA's row.
        heads = max(4, d // 64)
        return "DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
            hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, kv_lora_rank=d // 2, q_lora_rank=3 * d // 4,
            first_k_dense_replace=layers, intermediate_size=(d * 8 // 3 + 15) // 16 * 16,
            max_position_embeddings=max_len, rms_norm_eps=1e-6, tie_word_embeddings=False,
            **common)
    raise ValueError(f"--models: {name!r} is not one of gpt2, llama, mamba2, deepseek_v3.")


def build_pair(name: str):
    """(HF model, tx model with its weights, HF config dict)."""
    import torch
    import transformers
    max_len = max(_SEQ.value, _PROMPT.value + _NEW.value)
    cls_name, config_name, config = _shapes(name, _D_MODEL.value, _LAYERS.value,
                                            _VOCAB.value, max_len)
    torch.manual_seed(0)
    ref = getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))
    with torch.no_grad():
        for key, p in ref.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in key or "ln_" in key else _SPREAD * noise)
    ref.eval()
    with tempfile.TemporaryDirectory() as path:  # moved across as a checkpoint would be
        ref.save_pretrained(path)
        model = hf.load(path)
    return ref, model, config


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(tx_fn, torch_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of each, alternating tx and PyTorch. Both have already run once (the
    agreement checks), so compilation and warm-up are behind them."""
    tx_times, torch_times = [], []
    for _ in range(repeats):
        for fn, times in ((tx_fn, tx_times), (torch_fn, torch_times)):
            time.sleep(_PAUSE.value)
            times.append(_timed(fn))
    return statistics.median(tx_times), statistics.median(torch_times)


def forward_row(name, ref, model, ids):
    import torch
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)

    def torch_forward():
        with torch.inference_mode():
            return ref(ids_t).logits

    got = np.asarray(forward(state, ids))
    diff = float(np.abs(got - torch_forward().numpy()).max())
    assert diff <= _TOL.value, f"{name}: max abs logit diff {diff} > {_TOL.value}"
    tx_s, torch_s = interleaved(lambda: forward(state, ids).block_until_ready(),
                                torch_forward, _REPEATS.value)
    return dict(work="forward", batch=ids.shape[0], tokens=ids.size, tx_s=tx_s,
                torch_s=torch_s, max_abs_logit_diff=diff)


def train_row(name, ref, model, ids):
    """One AdamW step on next-token cross-entropy; each side keeps its own copy of the
    weights, so they drift apart after the first step (only the first loss is compared)."""
    import copy

    import torch
    b, t = ids.shape
    inputs, targets = ids[:, :-1], ids[:, 1:]
    batch = {"inputs": inputs, "targets": targets, "weights": jnp.ones(targets.shape)}
    optimizer = optax.adamw(_LR.value, b1=0.9, b2=0.999, eps=1e-8, weight_decay=_WEIGHT_DECAY)
    train_state = init_state(copy.deepcopy(model), optimizer)
    step = make_train_step(train_state.graphdef, optimizer)
    arrays = list(train_state.arrays())

    ref_train = copy.deepcopy(ref).train()
    opt = torch.optim.AdamW(ref_train.parameters(), lr=_LR.value, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=_WEIGHT_DECAY)
    inputs_t = torch.tensor(np.asarray(inputs), dtype=torch.long)
    targets_t = torch.tensor(np.asarray(targets), dtype=torch.long)

    def torch_step():
        logits = ref_train(inputs_t).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets_t.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    def tx_step():
        *arrays[:3], metrics = step(*arrays, batch)
        return float(metrics["loss_sum"] / metrics["count"])

    tx_loss, torch_loss = tx_step(), torch_step()  # first step: same weights, same loss
    assert abs(tx_loss - torch_loss) <= _TOL.value, f"{name}: loss {tx_loss} vs {torch_loss}"
    tx_s, torch_s = interleaved(tx_step, torch_step, _REPEATS.value)
    return dict(work="train", batch=b, tokens=inputs.size, tx_s=tx_s, torch_s=torch_s,
                first_loss_diff=abs(tx_loss - torch_loss))


def attention_row(name, model, ids, implementation, work):
    """Causal attention with the model's heads on random q, k, v, forward and backward, by
    ``implementation``: the q/k/v gradients for a random cotangent are checked against
    PyTorch's before timing."""
    import torch
    from tx.kernels import masks
    from tx.attention import registry
    b, t = ids.shape
    n, kh, h = (model.config.attention.num_heads, model.config.attention.kv_heads,
                model.config.head_dim)
    hv, spec = h, _mla_spec(model)
    if spec is not None:  # MLA's expanded form: every head its own K/V, v narrower than q/k
        kh, h, hv = n, spec.qk_nope_head_dim + spec.qk_rope_head_dim, spec.v_head_dim
    rng = np.random.RandomState(2)
    q, k, v, do = (rng.standard_normal(shape).astype(np.float32)
                   for shape in ((b, t, n, h), (b, t, kh, h), (b, t, kh, hv), (b, t, n, hv)))

    def loss(q, k, v):
        out = registry.attend(q, k, v, mask=masks.Causal(), implementation=implementation)
        return (out * do).sum()

    tx_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    torch_in = [torch.tensor(x).transpose(1, 2) for x in (q, k, v)]  # [B, heads, T, H]
    do_t = torch.tensor(do).transpose(1, 2)

    def torch_grads():
        leaves = [x.clone().requires_grad_() for x in torch_in]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True,
                                                               enable_gqa=kh != n)
        out.backward(do_t)
        return [x.grad.transpose(1, 2).numpy() for x in leaves]

    diff = max(float(np.abs(np.asarray(a) - w).max())
               for a, w in zip(tx_grads(q, k, v), torch_grads()))
    assert diff <= _TOL.value, f"{name}: attention gradients differ by {diff} > {_TOL.value}"
    tx_s, torch_s = interleaved(lambda: jax.block_until_ready(tx_grads(q, k, v)), torch_grads,
                                _REPEATS.value)
    return dict(work=work, batch=b, tokens=b * t, tx_s=tx_s, torch_s=torch_s,
                max_abs_grad_diff=diff, heads=n, kv_heads=kh, head_dim=h, v_head_dim=hv,
                implementation=",".join(implementation))


def _mla_spec(model):
    """The ``tx.attention.mla.MLA`` value of the model's layers, or None."""
    from tx.attention.mla import MLA
    return next((m for m in model.config.attention.masks if isinstance(m, MLA)), None)


def decode_rows(name, ref, model, batch):
    import torch
    new = _NEW.value
    prompt = np.random.RandomState(1).randint(3, _VOCAB.value, (batch, _PROMPT.value))
    prompt_t = torch.tensor(prompt, dtype=torch.long)

    def hf_generate():
        with torch.inference_mode():
            out = ref.generate(prompt_t, attention_mask=torch.ones_like(prompt_t),
                               do_sample=False, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0)
        return out[:, prompt.shape[1]:].numpy()

    def tx_generate(cache):
        return lambda: generate(model, prompt, max_new_tokens=new, cache=cache).tokens

    # A recurrent model's cache is its state (tx.attention.recurrent): no pages to compare.
    pageable = _pageable(model)
    contiguous, paged = tx_generate(Contiguous()), tx_generate(Paged(_PAGE.value))
    want = hf_generate()
    for label, fn in (("contiguous", contiguous), ("paged", paged))[:1 + pageable]:
        got = fn()
        assert np.array_equal(got, want), f"{name} B={batch}: tx {label} greedy tokens differ"
    tx_s, torch_s = interleaved(contiguous, hf_generate, _REPEATS.value)
    common = dict(batch=batch, tokens=batch * new, greedy_identical=True)
    rows = [dict(work="decode", tx_s=tx_s, torch_s=torch_s, **common)]
    if pageable:
        paged_s, contiguous_s = interleaved(paged, contiguous, _REPEATS.value)
        rows.append(dict(work="paged_vs_contiguous", tx_s=paged_s, torch_s=None,
                         contiguous_s=contiguous_s, **common))
    return rows


def _pageable(model) -> bool:
    """Every layer's cache holds K/V pages (softmax attention), none a recurrent state."""
    return all(getattr(block.self_attn, "pageable", True) for block in model.tower.blocks)


def run() -> list[dict]:
    import torch
    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    load_before = os.getloadavg()[0]
    rows = []
    for name in _MODELS.value:
        ref, model, config = build_pair(name)
        ids = jnp.asarray(np.random.RandomState(0).randint(
            3, _VOCAB.value, (_BATCH.value, _SEQ.value + 1)), jnp.int32)
        found = []
        if "forward" in _WORK.value:
            found.append(forward_row(name, ref, model, ids[:, :-1]))
        if "train" in _WORK.value:
            found.append(train_row(name, ref, model, ids))
        if "attention" in _WORK.value and _pageable(model):  # Mamba-2 has no softmax layer
            found += [attention_row(name, model, ids[:, :-1], implementation, work)
                      for work, implementation in (("attention", attention_registry.defaults()),
                                                   ("attention_xla", ("xla",)))]
        if "decode" in _WORK.value:
            for batch in _DECODE_BATCHES.value:
                found += decode_rows(name, ref, model, int(batch))
        for row in found:
            if name == "mamba2":
                row.update(torch_path=_mamba2_torch_path())
            row.update(bench="vs_hf", model=name, d_model=_D_MODEL.value, layers=_LAYERS.value,
                       vocab=_VOCAB.value, **_ratios(row))
            row.update(torch_threads=torch.get_num_threads(), **_versions(torch))
            rows.append(row)
    for row in rows:  # the 1-minute load average around the run (2 cores: 2.0 is busy)
        row.update(load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    return rows


def _mamba2_torch_path() -> str:
    """Which Mamba-2 forward transformers runs: its CUDA kernels need ``mamba_ssm`` (and a GPU);
    otherwise its PyTorch reference ``torch_forward``, what a CPU user gets."""
    import importlib.util
    return "cuda_kernels" if importlib.util.find_spec("mamba_ssm") else "torch_forward"


def _ratios(row) -> dict:
    tokens = row["tokens"]
    out = {"tx_tokens_per_s": round(tokens / row["tx_s"], 1)}
    if row["torch_s"] is not None:
        out.update(torch_tokens_per_s=round(tokens / row["torch_s"], 1),
                   tx_over_torch=round(row["torch_s"] / row["tx_s"], 3))
    else:  # paged against contiguous, both tx
        out.update(contiguous_tokens_per_s=round(tokens / row["contiguous_s"], 1),
                   paged_over_contiguous=round(row["contiguous_s"] / row["tx_s"], 3))
    return out


def _versions(torch) -> dict:
    import transformers
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version())


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<12}{'work':<21}{'B':>3}{'tx tok/s':>11}{'other tok/s':>13}{'ratio':>8}")
    for r in rows:
        other = r.get("torch_tokens_per_s", r.get("contiguous_tokens_per_s"))
        ratio = r.get("tx_over_torch", r.get("paged_over_contiguous"))
        print(f"{r['model']:<12}{r['work']:<21}{r['batch']:>3}{r['tx_tokens_per_s']:>11,.0f}"
              f"{other:>13,.0f}{ratio:>8.2f}")
    if rows:
        print("ratio: tx / PyTorch tokens/s (paged_vs_contiguous: tx paged / tx contiguous); "
              f"torch threads {rows[0]['torch_threads']}; load average "
              f"{rows[0]['load_before']} -> {rows[0]['load_after']}")
    paths = {r["torch_path"] for r in rows if "torch_path" in r}
    if paths:
        print(f"mamba2: transformers ran its {'/'.join(sorted(paths))} path ('torch_forward': "
              "the PyTorch reference, used without mamba_ssm, as on any CPU)")


def main(argv):
    del argv
    rows = run()
    print_table(rows)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
