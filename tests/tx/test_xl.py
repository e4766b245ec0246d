"""Transformer-XL: relative positions held to the paper's equations (Dai et al., 2019, section
3.3), the segment-memory exactness property, training with memory and exact resume."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tx.kernels import masks

from tx import config as config_lib
from tx import data, flags, models
from tx.attention import memory
from tx.attention.xl import XL, XLLayerPositions
from tx.train import configs as configs_lib
from tx.train import loop
from tx.train.configs import ConfigError
from tx.train import evaluation
from tx.train.evaluation import evaluate_with_memory
from tx.train.metrics import read_jsonl

D, N, LAYERS, L, B = 32, 2, 2, 6, 2
H = D // N


def tiny(positions="xl", memory_length=0, **more):
    return flags.model_config(positions=positions, d_model=D, num_heads=N, num_layers=LAYERS,
                              d_ff=64, vocab_size=264, memory_length=memory_length, **more)


def randomise(model, seed=1):
    """Every parameter random (u, v and W_r start near zero), so each term of the score
    counts."""
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(tree, new))
    return model


# --- the paper's equations, written out in numpy float64 -------------------------------------

def paper_scores(q, k, u, v, w_r, q_pos, kv_pos):
    """``A_ij`` of section 3.3 for one batch row: ``q [T, N, H]``, ``k [S, N, H]``,
    ``w_r [D, N, H]``, ``R_d = [sin(d ω) | cos(d ω)]``; returns ``[N, T, S]``."""
    q, k, u, v, w_r = (np.asarray(a, np.float64) for a in (q, k, u, v, w_r))
    omega = 10000.0 ** (-np.arange(0, w_r.shape[0], 2) / w_r.shape[0])
    rel = (np.asarray(q_pos)[:, None] - np.asarray(kv_pos)[None, :]).astype(np.float64)
    r = np.concatenate([np.sin(rel[..., None] * omega), np.cos(rel[..., None] * omega)], -1)
    wr = np.einsum("tsd,dnh->ntsh", r, w_r)  # W_r R_{i-j}
    a = np.einsum("tnh,snh->nts", q, k)
    b = np.einsum("tnh,ntsh->nts", q, wr)
    c = np.einsum("nh,snh->ns", u, k)[:, None, :]
    d = np.einsum("nh,ntsh->nts", v, wr)
    return a + b + c + d


@pytest.fixture(scope="module")
def xl_layer():
    layer = XLLayerPositions(D, N, H, rngs=nnx.Rngs(0))
    return randomise(layer, seed=2)


@pytest.mark.parametrize("offset, tol", [(0, 1e-6), (10_000, 2e-4)])
def test_widened_dot_products_are_the_papers_scores(xl_layer, offset, tol):
    """At positions up to ~20 the widened q~·k~ is the paper's score to fp32 rounding
    (measured 7e-8 relative); near position 10^4 the absolute angles cost ~P * 2^-24 per
    factor (measured 5e-5; 1e-5 at 10^3, 5e-4 at 10^5)."""
    rng = np.random.default_rng(0)
    t = 12
    q = rng.standard_normal((1, t, N, H)).astype(np.float32)
    k = rng.standard_normal((1, t, N, H)).astype(np.float32)
    pos = jnp.asarray(offset + np.arange(t, dtype=np.int32))[None]
    qw, kw = xl_layer.rotate(jnp.asarray(q), jnp.asarray(k), pos)
    assert qw.shape == kw.shape == (1, t, N, H + D)
    got = np.einsum("tnh,snh->nts", np.asarray(qw[0], np.float64), np.asarray(kw[0], np.float64))
    want = paper_scores(q[0], k[0], xl_layer.u_nh[...], xl_layer.v_nh[...],
                        xl_layer.r_dnh[...], pos[0], pos[0])
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < tol, rel
    if offset == 0:
        # the positional terms matter: dropping W_r changes the scores
        assert np.abs(want - paper_scores(q[0], k[0], xl_layer.u_nh[...], xl_layer.v_nh[...],
                                          0 * xl_layer.r_dnh[...], pos[0], pos[0])).max() > 0.1


def _reference_layer(attn, x):
    """The XL attention layer from the equations: causal softmax of ``A_ij / sqrt(H)``."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (np.asarray(p[...], np.float64) for p in
                      (attn.q_dnh, attn.k_dkh, attn.v_dkh, attn.o_nhd))
    pos = attn.positions
    out = []
    for row in x:
        q, k, v = (np.einsum("td,dnh->tnh", row, w) for w in (wq, wk, wv))
        t = row.shape[0]
        scores = paper_scores(q, k, pos.u_nh[...], pos.v_nh[...], pos.r_dnh[...],
                              np.arange(t), np.arange(t)) / np.sqrt(H)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(np.einsum("nhd,tnh->td", wo, np.einsum("nts,snh->tnh", p, v)))
    return np.stack(out)


@pytest.mark.parametrize("implementation", ["xla", "cpu", "pallas"])
def test_xl_attention_layer_matches_the_equations(implementation):
    """Through each backend: values zero-padded to the widened q/k, the scale of H."""
    model = randomise(models.build(tiny(implementation=(implementation,))))
    attn = model.tower.self_attentions()[0]
    x = jax.random.normal(jax.random.key(3), (B, 9, D), jnp.float32)
    got = attn(x)
    want = _reference_layer(attn, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


# --- the exactness property -----------------------------------------------------------------

def _block_outputs(model, tokens):
    """Every layer's output (the tower's loop, written out so each layer can be compared)."""
    tower = model.tower
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = tower.positions.embed(tower.embed(tokens), pos)
    outs = []
    for block in tower.blocks:
        x = block(x, pos)
        outs.append(x)
    return outs


def _pair(positions, m):
    """A model with memory ``m`` and the same parameters in one model that runs the
    concatenated segments at once under ``SegmentMemory(L, m)``."""
    cfg = tiny(positions, memory_length=m)
    recurrent = randomise(models.build(cfg))
    one_pass_cfg = config_lib.replace(cfg, memory_length=0, attention=config_lib.replace(
        cfg.attention, masks=(masks.SegmentMemory(L, m),)))
    one_pass = models.build(one_pass_cfg)
    nnx.update(one_pass, nnx.state(recurrent, nnx.Param))
    return recurrent, one_pass


# M < L, M = L, M > L (evaluation's longer memory), and other relative schemes.
@pytest.mark.parametrize("positions, m", [("xl", 4), ("xl", L), ("xl", 2 * L + 3),
                                          ("rope", 3)])
def test_segments_with_memory_equal_one_pass_under_the_segment_memory_mask(positions, m):
    recurrent, one_pass = _pair(positions, m)
    tokens = jax.random.randint(jax.random.key(4), (B, 3 * L), 0, 264)
    whole = _block_outputs(one_pass, tokens)
    memory.init_memory(recurrent, B, m)
    worst = 0.0
    for s in range(3):
        segment = _block_outputs(recurrent, tokens[:, s * L:(s + 1) * L])
        for layer, (got, want) in enumerate(zip(segment, whole)):
            want = want[:, s * L:(s + 1) * L]
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            assert err < 1e-5, (s, layer, err)
            worst = max(worst, err)
    # The memory is seen: the same segment without it differs.
    memory.init_memory(recurrent, B, m)
    alone = _block_outputs(recurrent, tokens[:, 2 * L:])[-1]
    assert float(jnp.max(jnp.abs(alone - whole[-1][:, 2 * L:]))) > 1e-3


def test_memory_is_stop_gradient():
    """Gradients of segment 2's loss do not reach segment 1's tokens through the memory."""
    recurrent, _ = _pair("xl", L)
    tokens = jax.random.randint(jax.random.key(5), (B, 2 * L), 0, 264)
    memory.init_memory(recurrent, B, L)
    graphdef, state = nnx.split(recurrent)
    x1 = recurrent.tower.embed(tokens[:, :L])

    def seg2_loss(x1, through_memory=True):
        model = nnx.merge(graphdef, state, copy=True)
        for block in model.tower.blocks:  # segment 1 fills every layer's memory from x1
            x1 = block(x1)
        seg2 = model(tokens[:, L:]).sum()
        return seg2 if through_memory else seg2 + x1.sum()

    assert float(jnp.abs(jax.grad(seg2_loss)(x1)).max()) == 0.0
    assert float(jnp.abs(jax.grad(seg2_loss)(x1, False)).max()) > 0  # x1 does carry grads


# --- configs, flags and bad input ------------------------------------------------------------

def test_flags_round_trip_xl_and_memory():
    cfg = tiny(memory_length=8)
    assert cfg.positions == XL() and cfg.memory_length == 8
    assert flags.parse(flags.ModelFlags(**flags.to_flags(cfg))) == cfg
    assert flags.to_flags(cfg)["memory_length"] == 8
    one_pass = flags.model_config(attention="segment_memory", xl_segment=L, xl_memory=4)
    assert one_pass.attention.masks == (masks.SegmentMemory(L, 4),)
    assert flags.parse(flags.ModelFlags(**flags.to_flags(one_pass))) == one_pass


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_memory_on_absolute_positions_is_refused_by_name(positions):
    with pytest.raises(ValueError, match=r"memory_length=4.*positions=.*absolute"):
        tiny(positions, memory_length=4)


def test_memory_on_an_encoder_is_refused():
    with pytest.raises(ValueError, match=r"memory_length=4.*not causal"):
        tiny("rope", memory_length=4, task="mlm")


# --- data, training with memory, exact resume ------------------------------------------------

def test_contiguous_rows_continue_the_previous_step():
    ds = data.make_dataset("bytes", batch_size=3, seq_len=8, seed=1, split="train",
                           contiguous=True, max_bytes=50_000, eval_fraction=0.5)
    a, b = ds.batch(4), ds.batch(5)
    np.testing.assert_array_equal(b["inputs"][:, 0], a["targets"][:, -1])
    np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    assert len({tuple(r) for r in a["inputs"]}) == 3  # rows read different lanes


def xl_config(steps=4, **train):
    cfg = flags.to_flags(tiny(memory_length=L))
    config = configs_lib.experiment(
        flags.ModelFlags(**cfg), dataset="bytes", seq_len=L,
        options={"contiguous": True, "max_bytes": 50_000, "eval_fraction": 0.5}, steps=steps,
        batch_size=2, warmup_steps=1, log_every=1, eval_batches=1, eval_every=steps,
        checkpoint_every=2, async_checkpoints=False)
    config.train.update(train)
    return config


def _losses(workdir):
    return [r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")]


def test_training_with_memory_resumes_exactly(tmp_path, monkeypatch):
    """The memory is checkpointed with the state: a run that dies after step 3 and resumes
    from step 2 gives the uninterrupted run's losses bit for bit. Resuming with the memory
    emptied instead gives other losses, so the saved memory is what makes it exact."""
    config = xl_config()
    loop.run(config, tmp_path, print_fn=None)
    first = _losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    lines = []
    loop.run(config, tmp_path, print_fn=lines.append)
    assert any(line.startswith("resuming from step 2") for line in lines)
    assert _losses(tmp_path) == first and len(first) == 4

    restore = loop.restore

    def without_memory(*args, **kwargs):
        start, restored = restore(*args, **kwargs)
        return start, {**restored, "rest": memory.cleared(restored["rest"])}

    monkeypatch.setattr(loop, "restore", without_memory)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    loop.run(config, tmp_path, print_fn=None)
    again = _losses(tmp_path)
    assert again[:2] == first[:2] and again[2] != first[2]
    # The run directory evaluates with a memory longer than its training segment.
    longer = evaluation.evaluate(None, tmp_path, memory_length=3 * L)
    assert longer["memory_length"] == 3 * L and np.isfinite(longer["eval_loss"])


def test_memory_needs_contiguous_data_and_no_accumulation(tmp_path):
    config = xl_config()
    config.data.options.contiguous = False
    with pytest.raises(ConfigError, match="memory_length=6.*contiguous=True"):
        loop.run(config, tmp_path / "a", print_fn=None)
    with pytest.raises(ConfigError, match="grad_accum=2"):
        loop.run(xl_config(grad_accum=2), tmp_path / "b", print_fn=None)


def test_evaluation_with_a_memory_longer_than_the_segment():
    """Three segments with memory 2L score as one pass under SegmentMemory(L, 2L) does."""
    m = 2 * L
    recurrent, one_pass = _pair("xl", m)
    ds = data.make_dataset("bytes", batch_size=B, seq_len=L, seed=0, split="eval",
                           contiguous=True, max_bytes=50_000, eval_fraction=0.5)
    got = evaluate_with_memory(recurrent, ds, memory_length=m, batches=3)
    batches = [ds.batch(i) for i in range(3)]
    inputs = np.concatenate([b["inputs"] for b in batches], 1)
    targets = np.concatenate([b["targets"] for b in batches], 1)
    logits = one_pass(jnp.asarray(inputs))
    want = float(optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean())
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["tokens"] == 3 * B * L and got["memory_length"] == m
    short = evaluate_with_memory(recurrent, ds, memory_length=1, batches=3)
    assert abs(short["loss"] - got["loss"]) > 1e-4


def test_xl_decoding_cache_stores_widened_keys():
    """Prefill then token-by-token decoding over a contiguous cache of k~ gives the full
    pass's logits."""
    model = randomise(models.build(tiny()))
    tokens = jax.random.randint(jax.random.key(6), (B, 9), 0, 264)
    full = model(tokens)
    model.init_cache(B, 16)
    steps = [model(tokens[:, :6])] + [model(tokens[:, i:i + 1]) for i in range(6, 9)]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full),
                               rtol=1e-5, atol=1e-5)
    # The planner counts what the cache holds: k~ and padded values, H + D wide.
    from tx.inference import memory as planner
    held = sum(x[...].nbytes for path, x in nnx.iter_graph(model)
               if isinstance(x, nnx.Variable) and "cache" in path and x[...].ndim == 4)
    assert planner.kv_cache_bytes(tiny(), B, 16) == held > 0


def test_segment_memory_mask_and_its_tile_map():
    """The predicate is the definition; its tile map lets a kernel skip the tiles past the
    diagonal and those before a segment's memory."""
    mask = masks.SegmentMemory(segment=64, memory=32)
    dense = mask.dense(256, 256)
    i, j = np.arange(256)[:, None], np.arange(256)[None, :]
    np.testing.assert_array_equal(dense, (j <= i) & (j >= (i // 64) * 64 - 32))
    tiles = mask.tile_map(256, 256, 32, 32)
    blocks = dense.reshape(8, 32, 8, 32)
    want = np.where(blocks.all((1, 3)), masks.FULL,
                    np.where(blocks.any((1, 3)), masks.PARTIAL, masks.EMPTY))
    np.testing.assert_array_equal(tiles, want)
    assert (tiles == masks.EMPTY).sum() > 40  # of 64 tiles: causal alone leaves 28 empty
    with pytest.raises(ValueError, match="segment=0"):
        masks.SegmentMemory(0, 4)
