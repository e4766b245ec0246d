"""examples/extending: each file adds one variant (a mask, a position scheme, a head with its
dataset, an attention implementation) with no edit to tx, and trains from the flags of
experiments/train.py, which imports the file as its config and so registers the variant.

Training runs in-process through the same config-file flag as experiments/train.py
(``train``), except the span example, which runs the script itself in a subprocess. Each
test also checks that its variant was really used, not a built-in fallback.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags as absl_flags
from flax import nnx
from ml_collections import config_flags

from tx.kernels import masks as M
from tx.kernels import reference, score_mods, tiles
from tx.kernels.block_sizes import BlockSizes
from tx.kernels.flash_attention import flash_attention
from tx import data
from tx import flags as tx_flags
from tx import models
from tx.attention import Attention, registry
from tx.train import configs, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "extending"
# example file -> (registry listing, the name it registers)
REGISTERS = {"dilated_mask": (tx_flags.patterns, "dilated"),
             "kerple_positions": (tx_flags.position_schemes, "kerple"),
             "span_head": (tx_flags.tasks, "span"),
             "my_attention": (registry.names, "mine")}
TINY = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.batch_size=8",
        "--config.train.warmup_steps=1", "--config.train.log_every=1",
        "--config.train.eval_batches=1", "--config.train.async_checkpoints=false"]


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Examples register names in process-wide tables; each test gets copies, so no name it
    registers outlives it (tests elsewhere enumerate every registered dataset)."""
    for module, table in ((tx_flags.PATTERNS, "_entries"), (tx_flags.POSITIONS, "_entries"),
                          (tx_flags.TASKS, "_entries"), (registry, "_BACKENDS"),
                          (data, "REGISTRY")):
        monkeypatch.setattr(module, table, dict(getattr(module, table)))


def load(name):
    """Imports an example file as a module (which registers its variant)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps_flags(steps):
    return [f"--config.train.{f}={steps}" for f in ("steps", "eval_every", "checkpoint_every")]


def parse(name, *overrides, steps=8):
    """``--config=examples/extending/<name>.py`` and overrides, parsed by the flag
    experiments/train.py defines (importing the file, which registers its variant)."""
    argv = ["train.py", f"--config={EXAMPLES / name}.py", *TINY, *steps_flags(steps),
            *overrides]
    values = absl_flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    values(argv)
    return config.value


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def run(config, workdir):
    """What experiments/train.py does with the parsed config; checks that it learned."""
    summary = loop.run(config, workdir, print_fn=None)
    records = metrics(workdir)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
    assert all(map(math.isfinite, losses)) and math.isfinite(summary["eval_loss"])
    assert np.mean(losses[-2:]) < losses[0], losses  # it learns
    return summary


def attention_masks(model):
    return [node.mask for _, node in nnx.iter_graph(model) if isinstance(node, Attention)]


# ----------------------------------------------------------------------------- every file


@pytest.mark.parametrize("name", sorted(REGISTERS))
def test_each_variant_is_one_short_file_that_registers_its_name(name):
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(REGISTERS)
    lines = (EXAMPLES / f"{name}.py").read_text().splitlines()
    assert len(lines) < 80, f"{name}.py has {len(lines)} lines"
    listing, registered = REGISTERS[name]
    assert registered not in listing()
    load(name)
    assert registered in listing()


# ------------------------------------------------------------------------- dilated mask


def kinds_from_dense(dense, bq, bk):
    """The tile map by brute force: out-of-range pairs count neither for "any" nor "all"."""
    t, s = dense.shape
    nq, nk = -(-t // bq), -(-s // bk)
    any_, all_ = np.zeros((nq * bq, nk * bk), bool), np.ones((nq * bq, nk * bk), bool)
    any_[:t, :s] = all_[:t, :s] = dense
    tiled = lambda x: x.reshape(nq, bq, nk, bk)  # noqa: E731
    return np.where(tiled(all_).all(axis=(1, 3)), M.FULL,
                    np.where(tiled(any_).any(axis=(1, 3)), M.PARTIAL, M.EMPTY))


def test_dilated_mask_definition_tile_map_and_flash_kernel():
    Dilated = load("dilated_mask").Dilated
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    for window, dilation in ((3, 1), (4, 3), (2, 8)):
        want = (i - j >= 0) & (i - j < window * dilation) & ((i - j) % dilation == 0)
        assert (Dilated(window, dilation).dense(40, 40) == want).all()
    # The closed-form tile map is exact: ragged edges, T != S, tiles of one row or column.
    for mask in (Dilated(3, 1), Dilated(4, 3), Dilated(2, 8), Dilated(5, 2)):
        for t, s, bq, bk in ((40, 40, 8, 8), (37, 50, 16, 8), (50, 37, 4, 16), (9, 9, 1, 1)):
            got = mask.tile_map(t, s, bq, bk)
            assert got.dtype == np.int8
            assert (got == kinds_from_dense(mask.dense(t, s), bq, bk)).all(), (mask, t, s)
    with pytest.raises(ValueError, match="dilation"):
        Dilated(4, 0)
    with pytest.raises(ValueError, match="causal"):  # an encoder's bidirectional attention
        tx_flags.model_config(task="mlm", attention="dilated")
    q, k, v = (jnp.asarray(np.random.default_rng(seed).standard_normal((1, 96, 2, 16)),
                           jnp.float32) for seed in range(3))
    mask = Dilated(3, 5)
    got = flash_attention(q, k, v, mask=mask, block_sizes=BlockSizes(*(6 * (16,))))
    np.testing.assert_allclose(got, reference.attention(q, k, v, mask=mask), atol=1e-5)


def test_dilated_mask_trains_in_the_flash_kernel_which_skips_its_empty_tiles(tmp_path,
                                                                              monkeypatch):
    tables = []  # every visit table the flash kernel builds while the train step is traced
    real = tiles.narrowed_table

    def spy(mask, q_len, kv_len, block_q, block_k, **kwargs):
        tables.append((mask, q_len, kv_len, block_q, block_k, kwargs["transpose"]))
        return real(mask, q_len, kv_len, block_q, block_k, **kwargs)

    monkeypatch.setattr(tiles, "narrowed_table", spy)
    # One layer of two heads keeps the interpreted kernel cheap on CPU. At 192 tokens the
    # default tiles (64 wide on CPU) leave past key tiles wholly beyond the window's 10 keys.
    config = parse("dilated_mask", "--config.model.window=4", "--config.model.stride=3",
                   "--config.data.seq_len=192", "--config.model.num_layers=1",
                   "--config.model.layer_pattern=dilated",
                   "--config.model.num_heads=2", steps=4)
    assert tuple(config.model.implementation) == ("pallas", "xla")
    run(config, tmp_path)
    model = models.build(configs.resolve(config).model)
    (layer,) = attention_masks(model)  # one layer: layer_pattern=dilated
    assert type(layer).__name__ == "Dilated" and (layer.window, layer.dilation) == (4, 3)
    dilated = [t for t in tables if t[0] == layer]
    assert {t[-1] for t in dilated} == {False, True}  # forward/dq and dk/dv lists
    for mask, t, s, bq, bk, transpose in dilated:
        kinds = tiles.tile_kinds(mask, t, s, bq, bk)
        causal = tiles.tile_kinds(M.Causal(), t, s, bq, bk)
        # The window empties tiles that causality alone keeps (keys too far in the past)...
        assert (kinds[causal == M.EMPTY] == M.EMPTY).all()
        assert (kinds == M.EMPTY).sum() > (causal == M.EMPTY).sum(), kinds
        # ...and no list visits an EMPTY tile: the kernel's loops never reach them.
        table = (tiles.q_block_lists if transpose else tiles.kv_block_lists)(mask, t, s, bq, bk)
        for row, row_kinds in zip(np.asarray(table), kinds.T if transpose else kinds):
            listed = row[tiles.HEADER:tiles.HEADER + row[tiles.NUM_TOTAL]]
            assert sorted(listed) == list(np.flatnonzero(row_kinds != M.EMPTY))
        assert tiles.visited_tiles(table) < kinds.size - (causal == M.EMPTY).sum()


# ------------------------------------------------------------------- KERPLE positions


def test_kerple_positions_train_their_own_parameters(tmp_path):
    """A learned score modifier: each layer owns its r1, r2, and the Pallas kernels alone
    (interpret mode here) train them: forward, and their gradients from the backward."""
    config = parse("kerple_positions", "--config.model.positions=kerple",
                   "--config.model.implementation=pallas", steps=4)
    assert tuple(config.model.implementation) == ("pallas",)
    run(config, tmp_path)
    resolved = configs.resolve(config)
    trained, step = loop.load_model(resolved, tmp_path)
    fresh = loop.build_model(resolved)
    assert step == config.train.steps
    module = trained.tower.positions
    assert type(module).__name__ == "KerplePositions" and not nnx.state(module, nnx.Param)
    layers, initial = trained.tower.self_attentions(), fresh.tower.self_attentions()
    assert len(layers) == 2 and all(a.positions is module for a in layers)  # shared
    for layer, init in zip(layers, initial):
        assert layer.learned_names == ("r1_raw", "r2_raw")  # each layer's own
        # They moved: the modifier was in the loss, and its gradients came back.
        assert not np.allclose(layer.r1_raw[...], init.r1_raw[...])
        assert not np.allclose(layer.r2_raw[...], init.r2_raw[...])
    pos = jnp.arange(6, dtype=jnp.int32)
    bias = np.asarray(score_mods.reference_logits(
        layers[0].logits_mod(), jnp.zeros((4, 6, 6)), head=jnp.arange(4)[:, None, None],
        batch=0, q_pos=pos[None, :, None], kv_pos=pos[None, None, :], num_heads=4))
    assert (np.diagonal(bias, axis1=1, axis2=2) == 0).all()
    assert (np.diff(bias[:, 5, ::-1], axis=-1) < 0).all()  # decays with the distance
    np.testing.assert_allclose(bias, bias.transpose(0, 2, 1))


# ---------------------------------------------------------------------------- span head


def test_span_dataset_marks_the_answer():
    example = load("span_head")
    ds = data.make_dataset("span_copy", batch_size=64, seq_len=20, num_symbols=5)
    batch = ds.batch(3)
    assert ds.task == "span" and ds.vocab_size == data.OFFSET + 7
    assert set(batch) == {"inputs", "start", "end", "lengths"}
    assert all(v.dtype == np.int32 for v in batch.values())
    rows = np.arange(64)
    inputs, start, end, lengths = (batch[k] for k in ("inputs", "start", "end", "lengths"))
    assert ((1 <= start) & (start <= end) & (end < lengths - 1)).all()
    assert (inputs[rows, start - 1] == example.OPEN).all()
    assert (inputs[rows, end + 1] == example.CLOSE).all()
    assert ((inputs == example.OPEN).sum(1) == 1).all()
    assert (inputs[np.arange(20)[None] >= lengths[:, None]] == data.PAD).all()
    assert not (batch["inputs"] == ds.batch(4)["inputs"]).all()


def test_span_head_trains_from_the_train_script(tmp_path, monkeypatch):
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"),
           f"--config={EXAMPLES / 'span_head.py'}", f"--workdir={tmp_path}", *TINY,
           *steps_flags(12), "--config.train.learning_rate=1e-2", "--config.model.num_layers=1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval_accuracy=" in out.stdout
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # This process has not registered the head or the dataset (the fixture isolates the
    # registries): the saved config's extensions must bring them, as for evaluate.py.
    monkeypatch.setattr(configs, "_EXTENSIONS", set())
    assert "span" not in tx_flags.tasks() and "span_copy" not in data.REGISTRY
    saved = loop.saved_config(tmp_path)
    assert list(saved.extensions) == [str(EXAMPLES / "span_head.py")]
    resolved = configs.resolve(saved)
    model, step = loop.load_model(resolved, tmp_path)
    assert step == 12 and type(model.config.head).__name__ == "SpanHead"
    batch = configs.make_datasets(resolved)[1].batch(0)
    logits = model(jnp.asarray(batch["inputs"]), lengths_b=jnp.asarray(batch["lengths"]))
    assert logits.shape == (8, 32, 2)


# ----------------------------------------------------------------- attention implementation


def test_my_attention_matches_the_reference_and_declines_what_it_cannot_serve():
    mine = load("my_attention").chunked_attention
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((2, 32, 4, 8), (2, 48, 2, 8), (2, 48, 2, 8)))
    segments = tuple(jnp.asarray(np.sort(rng.integers(0, 3, (2, n)), axis=1), jnp.int32)
                     for n in (32, 48))
    bias = jnp.asarray(rng.standard_normal((1, 4, 32, 48)), jnp.float32)
    kwargs = dict(mask=M.Local(5, 2), segment_ids=segments, bias=bias, scale=0.5,
                  kv_lengths=jnp.asarray([40, 20], jnp.int32))
    do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    @jax.jit
    def outputs_and_grads(q, k, v):
        def run(fn):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)
            return out, vjp(do)
        return run(mine), run(reference.attention)

    (got, got_grads), (want, want_grads) = outputs_and_grads(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Queries past key 20 + 5 see no key (zeros); the others do.
    assert (np.asarray(got[1, -1]) == 0).all() and (np.asarray(got[1, 0]) != 0).any()
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4)
    with pytest.raises(NotImplementedError, match="multiple of"):
        mine(q[:, :20], k, v)
    # The registry then serves the call with the next name.
    np.testing.assert_allclose(registry.attend(q[:, :20], k, v, implementation=("mine", "xla")),
                               reference.attention(q[:, :20], k, v), atol=1e-6)


def test_my_attention_trains_when_named_by_the_flag(tmp_path):
    config = parse("my_attention", "--config.model.implementation=mine",
                   "--config.model.num_layers=1")
    assert tuple(config.model.implementation) == ("mine",)
    calls = []
    backend = registry._BACKENDS["mine"]  # the backend the config file registered
    registered = backend.dense

    def counting(call):
        calls.append(call.q.shape)
        return registered(call)

    backend.dense = counting
    run(config, tmp_path)
    assert calls and all(shape[1:] == (48, 4, 8) for shape in calls), calls
    model = models.build(configs.resolve(config).model)
    assert [a.implementation for _, a in nnx.iter_graph(model)
            if isinstance(a, Attention)] == [("mine",)]


def test_my_attention_declines_score_modifiers_to_the_next_backend(tmp_path):
    """Under ALiBi the backend declines (it takes no score modifier) and xla serves: the run
    trains, and the registry says why mine passed."""
    config = parse("my_attention", "--config.model.implementation=mine,xla",
                   "--config.model.positions=alibi", "--config.model.num_layers=1", steps=4)
    backend, declined = registry._BACKENDS["mine"], []
    registered = backend.dense

    def counting(call):
        try:
            return registered(call)
        except NotImplementedError as e:
            declined.append(str(e))
            raise

    backend.dense = counting
    summary = run(config, tmp_path)
    assert declined and all("no score modifiers (ALiBi)" in d for d in declined), declined
    assert np.isfinite(summary["loss"])
    with pytest.raises(NotImplementedError, match=r"mine dense: no score modifiers \(ALiBi\)"):
        registry.attend(*(jnp.zeros((1, 16, 2, 8)),) * 3, implementation=("mine",),
                        score_mod=score_mods.ALiBi(jnp.ones((2,))))
