"""Context parallelism: ring and all-to-all attention over the ``context`` mesh axis.

The host-side plan (layouts, skipped tiles) and the refusals run here on one device. The
equality checks need 8 devices, which JAX fixes at start-up, so one subprocess runs them all
(this file as a script) and prints one JSON line per check:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m tests.tx.test_context_parallel

The README's context-parallel command runs as typed (the CLI in its own 8-device subprocess),
made small by appended overrides.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx.kernels import masks, reference, score_mods
from tx.parallel import MeshConfig, ring, ulysses

ROOT = pathlib.Path(__file__).resolve().parents[2]
B, T, N, K, H = 4, 32, 4, 2, 8
CASES = {  # name -> (mask, context, extra) for the ring-vs-reference checks
    "causal/2": (masks.Causal(), 2, "alibi"),
    "causal/8": (masks.Causal(), 8, "segments"),
    "local/4": (masks.Local(T // 8), 4, "lengths"),
    "local/8": (masks.Local(T // 8), 8, "t5"),
    "bigbird/4": (masks.BigBird(4), 4, "segments"),
    "bigbird/8": (masks.BigBird(4), 8, "mqa"),  # one K/V head, v wider than q/k (MLA-like)
}
SPARSE = masks.Local(3, 3) | masks.GlobalTokens((0,))  # no band: no local form per chunk pair


# ----------------------------------------------------------------------- host-side plan

def _visible_pairs(mask, layout, c, t):
    """The plan from the dense mask, independently of tile maps: [c, c, 2, 2]."""
    dense, chunk = mask.dense(t, t), t // (2 * c)
    ids = ring.chunk_ids(layout, c)
    out = np.zeros((c, c, 2, 2), bool)
    for d in range(c):
        for j in range(c):
            for a in range(2):
                for b in range(2):
                    qa, kb = ids[d, a] * chunk, ids[(d - j) % c, b] * chunk
                    out[d, j, a, b] = dense[qa:qa + chunk, kb:kb + chunk].any()
    return out


@pytest.mark.parametrize("mask", [masks.Causal(), masks.Local(7), masks.BigBird(4),
                                  masks.Local(3, 3) | masks.GlobalTokens((0,))])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_plan_visits_exactly_the_chunk_pairs_the_mask_shows(mask, layout):
    for c in (2, 4, 8):
        np.testing.assert_array_equal(ring.visits(mask, layout, c, 64, 64),
                                      _visible_pairs(mask, layout, c, 64))
        order = ring.token_order(layout, c, 64)
        assert sorted(order) == list(range(64))


def test_zigzag_balances_causal_and_the_plan_skips_the_masked_half():
    c, t = 8, 1024
    zig = ring.stats(masks.Causal(), "zigzag", c, t, t)
    flat = ring.stats(masks.Causal(), "contiguous", c, t, t)
    assert zig["imbalance"] == 1.0 and flat["imbalance"] > 1.5
    # 2c(2c+1)/2 of the (2c)^2 chunk pairs are visible under a causal mask.
    assert zig["skipped_tiles"] == pytest.approx(1 - (2 * c + 1) / (4 * c))
    assert ring.choose_layout(masks.Causal(), c, t, t) == "zigzag"
    # A window of T/8 sees two chunks of 2c = 16: most of the ring is skipped.
    assert ring.stats(masks.Local(t // 8), "contiguous", c, t, t)["skipped_steps"] > 0.7


def test_bad_input_is_refused_by_name_before_tracing():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("context",))
    q = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"q_len \(T\)=3 must be divisible by 2 \* mesh.context"):
        ring.ring_attention(q, q, q, mesh=mesh)
    with pytest.raises(ValueError, match="num_kv_heads=6"):
        ulysses.check_heads(8, 6, 4)
    with pytest.raises(ValueError, match="context_attention='ulysses'"):
        MeshConfig(context_attention="ulysses")
    with pytest.raises(ValueError, match="num_heads=6"):
        MeshConfig(context=4, context_attention="all_to_all").check_context(6, 6)
    MeshConfig(context=4, context_attention="all_to_all").check_context(8, 1)  # MQA gathers


def test_config_refuses_what_a_split_sequence_cannot_run_before_building():
    """At config time (``configs.resolve``), before the mesh or a step exists: a length the
    ring cannot cut, heads all-to-all cannot split, a layer that is not softmax attention."""
    from tx.train import configs as configs_lib

    def refusal(name, **fields):
        config = configs_lib.load_file(ROOT / "configs" / name)
        config.mesh.context = 4
        for key, value in fields.items():
            section, field = key.split("__")
            config[section][field] = value
        with pytest.raises(configs_lib.ConfigError) as e:
            configs_lib.resolve(config)
        return str(e.value)

    msg = refusal("mqar.py", data__seq_len=36)
    assert "data.seq_len=36 must be divisible by 8 under mesh.context=4" in msg
    assert "e.g. 40" in msg
    msg = refusal("mqar.py", data__seq_len=36, mesh__context_attention="all_to_all",
                  model__num_heads=6, model__num_kv_heads=6, model__d_model=48)
    assert "num_heads=6" in msg and "mesh.context=4" in msg
    msg = refusal("encoder_mlm.py", model__layer_pattern=("fnet", "full"), data__seq_len=64)
    assert "mesh.context=4" in msg and "(FourierMixing)" in msg


def test_mesh_flags_select_the_context_axis():
    from tx.train import configs as configs_lib
    config = configs_lib.load_file(ROOT / "configs" / "mqar.py")
    config.mesh.context, config.mesh.context_attention = 4, "all_to_all"
    mesh = configs_lib.mesh_config(config)
    assert mesh == MeshConfig(context=4, context_attention="all_to_all")
    assert mesh.shape == (1, 1, 1, 4) and mesh.size == 4


# --------------------------------------------------------------------------- 8 devices

# The subprocesses compile many small programs and run each a few times: LLVM's optimisation
# passes cost more than they save (the shared subprocess and the README run take ~40% less
# time); XLA's own HLO passes are unchanged, and so are the losses here.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _eight_devices() -> dict:
    """The environment of a subprocess with 8 host CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS=f"{flags} {FAST_COMPILE}")


@pytest.fixture(scope="module")
def eight():
    env = _eight_devices()
    proc = subprocess.run([sys.executable, "-m", "tests.tx.test_context_parallel"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line.pop("check"): line for line in lines}


def test_ring_equals_one_device_forward_and_gradients(eight):
    for name in CASES:
        err = eight["kernels"][name]
        assert err["out"] < 1e-5 and err["grads"] < 1e-5, (name, err)
        if CASES[name][2] in ("alibi", "t5"):  # the modifier's parameters get gradients
            assert err["mod_grads"] < 1e-5, (name, err)
    err = eight["kernels"]["2x2x2"]
    assert err["out"] < 1e-5 and err["grads"] < 1e-5 and err["mod_grads"] < 1e-5, err


def test_ring_blocks_run_through_the_backend_order(eight):
    """implementation=("pallas",): every block through the flash kernel (interpret mode),
    its lse's cotangent included, at shifted bands; a partly visible pair of a mask that is
    no band has no local form, and only xla serves it."""
    err = eight["blocks"]["pallas/local/4"]
    assert err["out"] < 1e-5 and err["grads"] < 1e-5 and err["served"] == ["pallas"], err
    # The default order on a CPU (cpu, xla): the cpu kernel has no block path.
    assert eight["kernels"]["served"] == ["xla"], eight["kernels"]["served"]
    assert "no local mask" in eight["blocks"]["pallas/sparse"]["message"]


def test_all_to_all_agrees_with_the_ring(eight):
    for name, err in eight["a2a"].items():
        assert err["out"] < 1e-5 and err["grads"] < 1e-5, (name, err)
    # T5 buckets, a user function of the head index and sinks, against one device.
    assert eight["a2a"]["modifiers/2x2x2"]["mod_grads"] < 1e-5, eight["a2a"]


def test_decoder_trains_and_resumes_across_context_sizes(eight):
    train = eight["train"]
    for name in ("ring/2x1x1x4", "a2a/2x1x2x2"):
        np.testing.assert_allclose(train[name], train["1x1x1x1"], rtol=1e-5, err_msg=name)
    resume = eight["resume"]
    np.testing.assert_allclose(resume["context1"], resume["context4"], rtol=1e-5)
    assert "FourierMixing" in eight["refuse"]["message"]


def test_encoder_and_seq2seq_train_on_a_split_sequence(eight):
    """Losses equal one device's; every attention layer ran split (the decoder's
    cross-attention too: 16 queries over 32 encoder keys), none on a whole sequence."""
    losses, routes, paths = (eight["families"][k] for k in ("losses", "routes", "paths"))
    np.testing.assert_allclose(losses["encoder/ring/2x1x1x4"], losses["encoder/1x1x1x1"],
                               rtol=1e-5)
    for name in ("seq2seq/ring/2x1x1x4", "seq2seq/a2a/2x1x2x2"):
        np.testing.assert_allclose(losses[name], losses["seq2seq/1x1x1x1"], rtol=1e-5,
                                   err_msg=name)
    # Two encoder layers; seq2seq: encoder self, decoder causal self and cross-attention.
    assert routes["encoder/ring/2x1x1x4"] == {"ring_attention": 2}, routes
    assert routes["seq2seq/ring/2x1x1x4"] == {"ring_attention": 3}, routes
    assert routes["seq2seq/a2a/2x1x2x2"] == {"all_to_all_attention": 3}, routes
    assert routes["seq2seq/1x1x1x1"] == {} and paths["seq2seq/1x1x1x1"] == ["dense"], paths
    assert paths["encoder/ring/2x1x1x4"] == paths["seq2seq/ring/2x1x1x4"] == ["block"], paths


def test_generate_prefills_through_the_ring(eight):
    gen = eight["generate"]
    assert gen["context4"] == gen["one"]
    # The prompt's attention ran as ring blocks; decoding through the cache (dense path).
    assert "block" in gen["paths"] and {"cached", "dense"} & set(gen["paths"]), gen["paths"]
    # MLA layers prefill their latent cache through the ring too, then decode absorbed.
    assert gen["mla_context4"] == gen["mla_one"] and "block" in gen["mla_paths"], gen


def test_collective_bytes_in_the_compiled_hlo_match_the_formula(eight):
    for name, (hlo, formula) in eight["bench"].items():
        assert hlo == formula > 0, name


# ------------------------------------------------------------------ the README's command

README_FLAG = "--config.mesh.context=4"
# Appended to the README's command to keep the run small; the README's own flags (the config,
# the data x context mesh) are kept as written.
SMALL = ("--config.train.steps=3", "--config.model.d_model=32", "--config.model.d_ff=64",
         "--config.model.num_layers=1", "--config.model.max_len=16", "--config.data.seq_len=16",
         "--config.train.batch_size=2", "--config.train.eval_batches=1",
         "--config.train.log_every=1", "--config.train.async_checkpoints=False")


def _readme_command() -> list[str]:
    """The README's context-parallel command: the one logical line (``\\`` continuations
    joined) of a ```bash block that holds ``README_FLAG``."""
    found, inside, line = [], False, ""
    for raw in (ROOT / "README.md").read_text().splitlines():
        if raw.startswith("```"):
            inside, line = raw.strip() == "```bash", ""
            continue
        if not inside:
            continue
        line += raw.rstrip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        if README_FLAG in line:
            found.append(line)
        line = ""
    assert len(found) == 1, f"README.md: expected one ```bash line with {README_FLAG}: {found}"
    return shlex.split(found[0])


def test_the_readme_command_trains_a_decoder_on_a_split_sequence(tmp_path):
    argv = _readme_command()
    assert argv[:2] == ["python", "experiments/train.py"], argv
    workdirs = [a for a in argv if a.startswith("--workdir=")]
    assert len(workdirs) == 1, argv
    argv = [sys.executable, *(f"--workdir={tmp_path}" if a in workdirs else a
                              for a in argv[1:]), *SMALL]
    env = _eight_devices()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mesh = json.loads((tmp_path / "config.json").read_text())["mesh"]
    assert (mesh["data"], mesh["context"]) == (2, 4), mesh
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all(), rows
    # The run names what served attention once: ring blocks (xla on a CPU) and no other
    # path (a whole-sequence call would add "; attention: ...").
    said = [r for r in (proc.stdout + proc.stderr).splitlines() if "attention" in r]
    assert any(re.fullmatch(r"ring attention blocks: xla \(\d+ calls\)", r)
               for r in said), said


# ------------------------------------------------------------------ the subprocess side

def _rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))


def _compare(fn, ref, q, k, v, mod):
    """Relative max errors of output, dq/dk/dv and the modifier's parameter gradients."""
    out, expect = jax.jit(fn)(q, k, v, mod), jax.jit(ref)(q, k, v, mod)
    w = jax.random.normal(jax.random.key(9), expect.shape)  # v's head dim may differ from q's

    def loss(f):
        return lambda q, k, v, mod: jnp.sum(f(q, k, v, mod) * w)
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3)))(q, k, v, mod)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2, 3)))(q, k, v, mod)
    res = {"out": _rel(out, expect), "grads": max(_rel(a, b) for a, b in zip(got[:3], want[:3]))}
    if mod is not None:
        res["mod_grads"] = max(_rel(a, b) for a, b in zip(jax.tree.leaves(got[3]),
                                                          jax.tree.leaves(want[3])))
    return res


def _inputs(extra):
    ks = jax.random.split(jax.random.key(0), 4)
    kh = 1 if extra == "mqa" else K
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, kh, H))
    v = jax.random.normal(ks[2], (B, T, kh, H + H // 2 if extra == "mqa" else H))
    kwargs, mod = {}, None
    if extra == "segments":  # packed documents, not aligned with the chunks
        seg = jnp.asarray(np.repeat([[0] * 10 + [1] * 13 + [2] * 9], B, axis=0), jnp.int32)
        kwargs["segment_ids"] = (seg, seg)
    if extra == "lengths":
        kwargs["kv_lengths"] = jnp.array([T, 20, 7, 1], jnp.int32)
    if extra == "alibi":
        mod = score_mods.ALiBi(jnp.array([0.5, 0.25, 0.125, 0.0625]))
    if extra == "t5":
        mod = score_mods.T5Bias(jax.random.normal(ks[3], (16, N)), num_buckets=16,
                                max_distance=32, bidirectional=True)
    return q, k, v, kwargs, mod


def _with_sinks(mod):
    """``mod`` and a learned sink per head: the sink joins each row's softmax once."""
    sinks = jax.random.normal(jax.random.key(5), (N,))
    return score_mods.chain(mod, score_mods.Sinks(sinks))


def _mesh(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape),
                             names)


def check_kernels():
    from tx.attention import registry
    out = {}
    with registry.recording() as records:
        _kernel_cases(out)
    out["served"] = sorted({b for path, b, _ in records if path == "block"})
    return out


def _kernel_cases(out):
    for name, (mask, c, extra) in CASES.items():
        q, k, v, kw, mod = _inputs(extra)
        if extra == "alibi":  # and sinks, merged once per row after the ring
            mod = _with_sinks(mod)
        mesh = _mesh((c,), ("context",))
        out[name] = _compare(
            lambda q, k, v, m: ring.ring_attention(q, k, v, mesh=mesh, mask=mask,
                                                   score_mod=m, **kw),
            lambda q, k, v, m: reference.attention(q, k, v, mask=mask, score_mod=m, **kw),
            q, k, v, mod)
    q, k, v, kw, _ = _inputs("segments")
    mod = _inputs("alibi")[-1]
    mesh = _mesh((2, 2, 2), ("data", "tensor", "context"))
    out["2x2x2"] = _compare(
        lambda q, k, v, m: ring.ring_attention(q, k, v, mesh=mesh, mask=masks.Causal(),
                                               score_mod=m, batch_axes="data",
                                               head_axis="tensor", **kw),
        lambda q, k, v, m: reference.attention(q, k, v, mask=masks.Causal(), score_mod=m,
                                               **kw), q, k, v, mod)


def check_blocks():
    from tx.attention import registry
    out = {}
    q, k, v, kw, _ = _inputs("segments")  # two rows: interpret mode is slow
    q, k, v = q[:2], k[:2], v[:2]
    kw = {"segment_ids": (kw["segment_ids"][0][:2], kw["segment_ids"][1][:2]),
          "kv_lengths": jnp.array([T, 7], jnp.int32)}
    for name, mask, c in (("pallas/local/4", masks.Local(T // 8), 4),):
        mesh, impl = _mesh((c,), ("context",)), (name.split("/")[0],)
        with registry.recording() as records:
            out[name] = _compare(
                lambda q, k, v, m: ring.ring_attention(q, k, v, mesh=mesh, mask=mask,
                                                       implementation=impl, **kw),
                lambda q, k, v, m: reference.attention(q, k, v, mask=mask, **kw),
                q, k, v, None)
        out[name]["served"] = sorted({b for path, b, _ in records if path == "block"})
    try:
        jax.eval_shape(lambda q: ring.ring_attention(
            q, k, v, mesh=_mesh((4,), ("context",)), mask=SPARSE,
            implementation=("pallas",)), q)
        out["pallas/sparse"] = {"message": "served"}
    except NotImplementedError as e:
        out["pallas/sparse"] = {"message": str(e)}
    return out


def check_a2a():
    out = {}
    cases = {"causal/2": ((2,), ("context",), {}, "segments"),
             "local/4-mqa": ((4,), ("context",), {}, "mqa"),
             "bigbird/2x2x2": ((2, 2, 2), ("data", "tensor", "context"),
                               {"batch_axes": "data", "head_axis": "tensor"}, "lengths")}
    for name, (shape, names, axes, extra) in cases.items():
        mask = masks.BigBird(4) if "bigbird" in name else \
            masks.Local(T // 8) if "local" in name else masks.Causal()
        q, k, v, kw, _ = _inputs(extra)
        mesh = _mesh(shape, names)
        out[name] = _compare(
            lambda q, k, v, m: ulysses.all_to_all_attention(q, k, v, mesh=mesh, mask=mask,
                                                            **axes, **kw),
            lambda q, k, v, m: ring.ring_attention(q, k, v, mesh=mesh, mask=mask, **axes,
                                                   **kw), q, k, v, None)
    # Per-head modifiers after the reshard to heads: each device's heads from its offset
    # (tensor shard, then context slice), a user function reading the head index included.
    q, k, v, kw, t5 = _inputs("t5")
    user = score_mods.ScoreFn(lambda s, b, h, qp, kp: s + 0.1 * h.astype(jnp.float32))
    mod = _with_sinks(score_mods.chain(t5, user))
    mesh = _mesh((2, 2, 2), ("data", "tensor", "context"))
    axes = {"batch_axes": "data", "head_axis": "tensor"}
    out["modifiers/2x2x2"] = _compare(
        lambda q, k, v, m: ulysses.all_to_all_attention(q, k, v, mesh=mesh, mask=masks.Causal(),
                                                        score_mod=m, **axes),
        lambda q, k, v, m: reference.attention(q, k, v, mask=masks.Causal(), score_mod=m),
        q, k, v, mod)
    return out


def check_bench():
    """The benchmark's HLO reading at a smoke size: collective bytes equal the formula."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "context_parallel_bench", ROOT / "benchmarks" / "context_parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.communication(64, 4, n=4, kh=4, h=8)
    return {r["attention"]: [r["hlo_bytes"], r["formula_bytes"]] for r in rows[:2]}


def _decoder(mesh, how="ring"):
    from tests.tx import mesh_checks
    config = mesh_checks.decoder(mesh[:3])
    config.mesh.context, config.mesh.context_attention = mesh[3], how
    return config


def check_train_and_resume():
    from tests.tx.mesh_checks import Trainer
    from tx.train.checkpoint import Checkpointer
    one = Trainer(_decoder((1, 1, 1, 1)))
    ring4 = Trainer(_decoder((2, 1, 1, 4)))
    train = {"1x1x1x1": one.train(0, 3), "ring/2x1x1x4": ring4.train(0, 3),
             "a2a/2x1x2x2": Trainer(_decoder((2, 1, 2, 2), "all_to_all")).train(0, 3)}
    print(json.dumps({"check": "train", **train}), flush=True)
    # Saved at context 4 after 2 steps; restored at context 1 and continued.
    ring4.reset().train(0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, keep=1, async_save=False)
        s = ring4.state
        ckpt.save(2, {"params": s.params, "rest": s.rest, "opt_state": s.opt_state},
                  {"step": 2})
        ckpt.wait()
        one.reset()
        s1 = one.state
        restored, _ = ckpt.restore(2, {"params": s1.params, "rest": s1.rest,
                                       "opt_state": s1.opt_state})
        s1.params, s1.rest, s1.opt_state = (restored["params"], restored["rest"],
                                            restored["opt_state"])
        ckpt.close()
    resume = {"context4": ring4.train(2, 2), "context1": one.train(2, 2)}
    print(json.dumps({"check": "resume", **resume}), flush=True)


def check_generate():
    """Greedy tokens of a prompt prefilled through the ring (context 4 x data 2) equal those
    of one device; the cache holds the whole prompt and decoding continues through it."""
    from flax import nnx

    from tx import models, parallel as parallel_lib
    from tx.attention import registry
    from tx.flags import model_config
    from tx.inference.generation import generate

    def tokens(cfg):
        prompt = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
        model = models.build(cfg)
        one = generate(model, prompt, max_new_tokens=6).tokens
        par = parallel_lib.Parallel(parallel_lib.make_mesh(MeshConfig(data=2, context=4)))
        sharded = models.build(cfg)
        parallel_lib.shard_module(sharded, par)  # its own compile: the inputs' shardings differ
        with parallel_lib.use(par), registry.recording() as records:
            split = generate(sharded, prompt, max_new_tokens=6).tokens
        return np.asarray(one).tolist(), np.asarray(split).tolist(), records

    shape = dict(d_model=32, d_ff=64, num_heads=4, max_len=32, num_layers=2)
    one, split, records = tokens(model_config(num_kv_heads=2, **shape))
    # MLA: the prompt's latent keys (one head of r + dr, values their first r columns).
    mla_one, mla_split, mla_records = tokens(model_config(
        layer_pattern="mla,full", mla_kv_rank=16, mla_rope_dim=8, mla_nope_dim=8, mla_v_dim=12,
        positions="rope", **shape))
    del nnx
    return {"one": one, "context4": split, "mla_one": mla_one, "mla_context4": mla_split,
            "paths": sorted({path for path, _, _ in records}),
            "mla_paths": sorted({path for path, _, _ in mla_records})}


def _family(make, mesh, how="ring"):
    config = make(mesh[:3])
    config.mesh.context, config.mesh.context_attention = mesh[3], how
    return config


def _seq2seq(mesh):
    """One encoder and one decoder layer with T5 relative positions (a score modifier read at
    global positions inside the ring); 8 query heads, 4 K/V heads, 16 target tokens."""
    from tests.tx import mesh_checks
    config = mesh_checks.seq2seq(mesh)
    config.model.num_layers, config.model.positions = 1, "t5"
    return config


def _longer_source(batch):
    """The source padded past every row's length to twice the target's: the decoder's 16
    queries cross-attend over 32 encoder keys, both split over the context axis. The padding
    is masked (``source_lengths``), and every mesh trains on the same padded batches."""
    source = batch["source"]
    return dict(batch, source=np.pad(source, ((0, 0), (0, source.shape[1]))))


def _routes(counts):
    """Counts the traced calls of the two context-parallel attentions (``context.attend``
    reaches them through these module attributes), so a run that never split the sequence
    cannot pass for one that did."""
    def count(module, name):
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        setattr(module, name, wrapped)
        return lambda: setattr(module, name, fn)
    return [count(ring, "ring_attention"), count(ulysses, "all_to_all_attention")]


def check_families():
    """The encoder (MLM) at context 4 (ring) and seq2seq at context 4 (ring) and context 2 x
    tensor 2 (all-to-all), 3 steps each, against one device."""
    import collections

    from tests.tx import mesh_checks
    from tx.attention import registry
    runs = (("encoder/1x1x1x1", mesh_checks.encoder, (1, 1, 1, 1), "ring"),
            ("encoder/ring/2x1x1x4", mesh_checks.encoder, (2, 1, 1, 4), "ring"),
            ("seq2seq/1x1x1x1", _seq2seq, (1, 1, 1, 1), "ring"),
            ("seq2seq/ring/2x1x1x4", _seq2seq, (2, 1, 1, 4), "ring"),
            ("seq2seq/a2a/2x1x2x2", _seq2seq, (2, 1, 2, 2), "all_to_all"))
    out = {"losses": {}, "routes": {}, "paths": {}}
    for name, make, mesh, how in runs:
        counts = collections.Counter()
        undo = _routes(counts)
        try:
            with registry.recording() as records:  # the step traces in its first call
                out["losses"][name] = mesh_checks.Trainer(_family(make, mesh, how)).train(
                    0, 3, _longer_source if make is _seq2seq else None)
        finally:
            for restore in undo:
                restore()
        out["routes"][name] = dict(counts)
        out["paths"][name] = sorted({path for path, _, _ in records})
    return out


def check_refuse():
    from tests.tx.mesh_checks import Trainer
    from tx.train import configs as configs_lib
    config = configs_lib.load_file(ROOT / "configs" / "encoder_mlm.py")
    m = config.model
    m.d_model, m.d_ff, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 4
    m.layer_pattern, m.max_len, config.data.seq_len = ("fnet", "full"), 16, 16
    config.train.batch_size = 2
    config.mesh.data, config.mesh.context = 2, 4
    try:
        t = Trainer(config)
        t.train(0, 1)
        return {"message": "not refused"}
    except ValueError as e:
        return {"message": str(e)}


def main():
    jax.config.update("jax_numpy_rank_promotion", "raise")
    import time
    for name, fn in (("kernels", check_kernels), ("blocks", check_blocks), ("a2a", check_a2a),
                     ("generate", check_generate), ("refuse", check_refuse),
                     ("bench", check_bench), ("train", check_train_and_resume),
                     ("families", check_families)):
        start = time.process_time()
        out = fn()
        if out is not None:
            print(json.dumps({"check": name, **out}), flush=True)
        print(f"{name}: {time.process_time() - start:.1f} s of CPU", file=sys.stderr)


if __name__ == "__main__":
    main()
