"""Bad input gives an error, never a wrong answer: prompt ids outside the vocabulary, page ids
outside the page pool, malformed Hugging Face checkpoints.

Host-side checks run before anything is compiled, so most tests here cost no compile. Inside
``jit`` a paged kernel cannot raise: an out-of-range page reads as empty (never as another
sequence's page), and ``paged_attention.checked`` reports it through ``checkify``.
"""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from tx import kernels
from tests.kernels.test_paged_attention import _assert_close, _pool, _reference
from tx import models
from tx.attention.paged import ForkPlan, PagedKVCache
from tx.flags import model_config
from tx.inference import generation
from tx.inference.beam import beam_search
from tx.inference.paged_cache import PagePool, copy_pages
from tx.interop import hf

V = 64


@pytest.fixture(scope="module")
def decoder():
    return models.build(model_config(attention="gqa", vocab_size=V, d_model=16, num_layers=1,
                                     d_ff=32))


# -- generate: prompt ids ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [V, -1, 2 ** 40])
def test_generate_rejects_prompt_ids_outside_the_vocab(decoder, bad):
    prompt = np.full((2, 4), 5, np.int64)
    prompt[1, 2] = bad
    with pytest.raises(ValueError, match=rf"prompt_bt\[1, 2\]={bad} \(batch row 1, column 2\)"
                       rf".*\[0, vocab_size={V}\)"):
        generation.generate(decoder, prompt, max_new_tokens=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 2.5])
def test_generate_rejects_float_prompt_ids_that_are_not_integers(decoder, bad):
    prompt = np.full((1, 3), 5.0, np.float32)
    prompt[0, 1] = bad
    with pytest.raises(ValueError, match=rf"prompt_bt\[0, 1\]={bad!r}.*not an integer token"):
        generation.generate(decoder, prompt, max_new_tokens=2)


def test_integral_float_prompt_ids_pass_the_check():
    generation.check_token_ids("prompt_bt", np.asarray([[0.0, 63.0]], np.float32), V)


def test_beam_search_rejects_prompt_ids_outside_the_vocab(decoder):
    with pytest.raises(ValueError, match=r"prompt_bt\[0, 0\]=64 .*vocab_size=64"):
        beam_search(decoder, jnp.asarray([[V, 1]], jnp.int32), max_new_tokens=2, num_beams=2)


def _raise_system_exit(code):
    raise SystemExit(code)


def test_generate_script_turns_bad_prompt_ids_into_one_error_line(decoder, monkeypatch,
                                                                  capsys):
    """experiments/generate.py in-process (no subprocess, no checkpoint): the library's
    ValueError becomes its one-line ``error: ...`` exit."""
    from absl import flags
    from tx.experiments import generate as script
    resolved = types.SimpleNamespace(model=types.SimpleNamespace(vocab_size=V))
    monkeypatch.setattr(script.workdir_lib, "saved_config", lambda workdir: None)
    monkeypatch.setattr(script.configs_lib, "resolve", lambda config: resolved)
    monkeypatch.setattr(script.workdir_lib, "load_model", lambda r, workdir: (decoder, 1))
    # The script leaves through os._exit (see experiments/_cli.py); keep pytest alive.
    monkeypatch.setattr(os, "_exit", _raise_system_exit)
    flags.FLAGS(["generate", "--workdir=unused", "--prompt=9 99999", "--max_new_tokens=2"])
    try:
        with pytest.raises(SystemExit) as exit_info:
            script.main(["generate"])
    finally:
        flags.FLAGS.unparse_flags()
    message = capsys.readouterr().err.strip() or str(exit_info.value.code)
    assert exit_info.value.code != 0
    assert message.startswith("error: prompt_bt[0, 2]=99999") and "\n" not in message


# -- paged attention under jit: out-of-range page ids read as empty ------------------------------
_JITTED = {}


def _jitted(split_k, ppb):
    if (split_k, ppb) not in _JITTED:
        _JITTED[split_k, ppb] = jax.jit(lambda *a: kernels.paged_attention(
            *a, split_k=split_k, pages_per_block=ppb))
    return _JITTED[split_k, ppb]


CONFIGS = [(2, 1), (1, 2)]  # (split_k, pages_per_block): a split merge; a multi-page load


@pytest.mark.parametrize("split_k, ppb", CONFIGS)
@pytest.mark.parametrize("bad_id", ["num_pages", "negative"])
def test_paged_kernel_under_jit_reads_an_out_of_range_page_as_empty(split_k, ppb, bad_id):
    q, k, v, table, lens = _pool([12, 16], n=4, kh=2, h=32, page=8)  # two pages each
    p = k.shape[1]
    bad = table.at[0, 1].set(p if bad_id == "num_pages" else -1)
    fn = _jitted(split_k, ppb)
    # Kernel and reference agree on the whole batch: sequence 1 is untouched.
    _assert_close(fn(q, k, v, bad, lens), _reference(q, k, v, bad, lens), "float32")
    # Sequence 0 sees exactly its first page, as if its length were 8 (a Full mask ignores
    # the query's position) ...
    want = _reference(q, k, v, table, lens.at[0].set(8))[0]
    # ... and no other page: every other page is NaN, so one foreign read shows.
    others = jnp.arange(p) != table[0, 0]
    k_bad = jnp.where(others[None, :, None, None], jnp.nan, k)
    v_bad = jnp.where(others[None, :, None, None], jnp.nan, v)
    _assert_close(fn(q, k_bad, v_bad, bad, lens)[0], want, "float32")
    _assert_close(_reference(q, k_bad, v_bad, bad, lens)[0], want, "float32")


@pytest.mark.parametrize("split_k, ppb", CONFIGS)
def test_paged_row_with_only_out_of_range_pages_is_zero(split_k, ppb):
    q, k, v, table, lens = _pool([12, 16], n=4, kh=2, h=32, page=8)
    bad = table.at[0].set(jnp.asarray([k.shape[1] + 3, -7], jnp.int32))
    for out in (_jitted(split_k, ppb)(q, k, v, bad, lens), _reference(q, k, v, bad, lens)):
        assert np.isfinite(np.asarray(out)).all() and not np.asarray(out[0]).any()
        _assert_close(out[1], _reference(q, k, v, table, lens)[1], "float32")


def test_checked_paged_attention_names_the_bad_entry_under_jit():
    q, k, v, table, lens = _pool([12, 16], n=4, kh=2, h=32, page=8)
    fn = jax.jit(lambda *a: kernels.paged_attention.checked(*a, split_k=1, pages_per_block=1))
    err, out = fn(q, k, v, table, lens)
    assert err.get() is None
    _assert_close(out, _reference(q, k, v, table, lens), "float32")
    err, _ = fn(q, k, v, table.at[1, 1].set(99), lens)
    with pytest.raises(checkify.JaxRuntimeError, match=r"block_tables\[1, 1\]=99: sequence 1, "
                       r"slot 1 .*num_pages=7"):
        err.throw()
    err, _ = fn(q, k, v, table, lens.at[1].set(17))
    with pytest.raises(checkify.JaxRuntimeError, match=r"lengths\[1\]=17 must be in \[1, "):
        err.throw()


# -- host-side block-table checks ----------------------------------------------------------------
def test_paged_kv_cache_rejects_a_block_table_outside_its_pool():
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\]=7: sequence 1, slot 1 names "
                       r"page 7.*num_pages=4"):
        PagedKVCache(np.asarray([[0, 1], [2, 7]]), 4, 8, 1, 16)
    plan = ForkPlan(np.asarray([[0, 1], [-1, 3]]), np.zeros((0, 2), np.int32), 0)
    with pytest.raises(ValueError, match=r"fork_plan.block_tables\[1, 0\]=-1"):
        PagedKVCache(np.asarray([[0, 1]]), 4, 8, 1, 16, fork_plan=plan)
    plan = ForkPlan(np.asarray([[0, 1], [2, 3]]), np.asarray([[1, 9]], np.int32), 0)
    with pytest.raises(ValueError, match=r"fork_plan.copies\[0\]=\(1, 9\): its dst page 9"):
        PagedKVCache(np.asarray([[0, 1]]), 4, 8, 1, 16, fork_plan=plan)


def test_page_pool_block_table_names_the_sequence_holding_a_bad_page():
    pool = PagePool(4, 2)
    a, b = pool.add_sequence([1, 2, 3]).seq_id, pool.add_sequence([4]).seq_id
    pool._seqs[b].pages[0] = 11  # stands in for a bookkeeping bug
    with pytest.raises(ValueError, match=rf"sequence {b}, slot 0 names page 11"):
        pool.block_table([a, b])


def test_copy_pages_rejects_pages_outside_the_pool():
    pages = jnp.zeros((1, 4, 2, 8))  # [K, P, L, H]
    with pytest.raises(ValueError, match=r"copies\[1\]=\(-2, 3\): its src page -2"):
        copy_pages(pages, pages, [(0, 1), (-2, 3)])


# -- hf.load: malformed checkpoints --------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = model_config(vocab_size=V, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=32,
                       activation="swiglu", norm="rmsnorm", positions="rope",
                       tie_embeddings=False, attention="causal")
    path = tmp_path_factory.mktemp("llama")
    hf.save(models.build(cfg), path)
    return path


def _copy_with(src, dst, *, config=None, tensors=None):
    from safetensors.numpy import save_file
    dst.mkdir()
    (dst / "config.json").write_text(config if config is not None else
                                     (src / "config.json").read_text())
    save_file(tensors if tensors is not None else hf.read_safetensors(src),
              str(dst / "model.safetensors"))
    return dst


def test_hf_load_names_a_malformed_config_json(llama_dir, tmp_path):
    text = (llama_dir / "config.json").read_text().replace('"model_type"', "model_type", 1)
    path = _copy_with(llama_dir, tmp_path / "ckpt", config=text)
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON \(.* at line \d+, "
                       r"column \d+\): fix or re-export"):
        hf.load(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        hf.load(path)


def test_hf_load_names_a_missing_tensor_and_the_files_searched(llama_dir, tmp_path):
    tensors = hf.read_safetensors(llama_dir)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    path = _copy_with(llama_dir, tmp_path / "ckpt", tensors=tensors)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' is missing "
                       r"from '.*ckpt/model\.safetensors'"):
        hf.load(path)


def test_hf_load_names_a_tensor_with_the_wrong_shape(llama_dir, tmp_path):
    tensors = hf.read_safetensors(llama_dir)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 12), np.float32)
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((16, 32), np.float32)  # transposed
    path = _copy_with(llama_dir, tmp_path / "ckpt", tensors=tensors)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' in "
                       r"'.*' has shape \(16, 12\) but .* expects \(16, 16\)"):
        hf.load(path)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    model = models.build(hf.config_from_hf(llama_dir))
    with pytest.raises(ValueError, match=r"up_proj\.weight' in the tensors has shape \(16, 32\)"
                       r" but .* expects \(32, 16\)"):
        hf.load_weights(model, {**hf.read_safetensors(llama_dir), **tensors})


def test_hf_load_names_a_truncated_safetensors_file(llama_dir, tmp_path):
    path = _copy_with(llama_dir, tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-16])
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a readable safetensors"):
        hf.load(path)
