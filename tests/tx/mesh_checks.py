"""Checks that need 8 devices, run in a subprocess by ``test_parallel.py`` (JAX fixes its device
count when it starts, and pytest workers have started it with one CPU device).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m tests.tx.mesh_checks train checkpoint kernels

Each named check prints one JSON line ``{"check": name, ...results}``; the test asserts on them.
Compiled steps are shared between checks of one process (most of the time is compiling).
"""

import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from tx.train import configs as configs_lib
from tx.train import loop
from tx.train.checkpoint import Checkpointer
from tx.train.optim import make_optimizer
from tx.train.step import create_state, make_train_step, state_shardings

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py does
jax.config.update("jax_numpy_dtype_promotion", "standard")


def _shrink(config, mesh):
    """8 query heads, 4 K/V heads (GQA), d_model 32, 2 layers, 16 tokens, 8 rows."""
    m, t = config.model, config.train
    m.d_model, m.d_ff, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 8, 4
    m.attention, m.max_len = "gqa", 16
    config.data.seq_len = 16
    t.batch_size, t.warmup_steps, t.steps, t.eval_batches = 8, 1, 3, 1
    t.async_checkpoints = False
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    return config


def decoder(mesh):
    config = configs_lib.load_file(ROOT / "configs" / "mqar.py")
    config.data.options.num_kv_pairs = 2
    return _shrink(config, mesh)


def seq2seq(mesh):
    return _shrink(configs_lib.load_file(ROOT / "configs" / "seq2seq.py", "copy"), mesh)


def encoder(mesh):
    """Masked LM on bytes (BERT-style: learned absolute positions, rows padded to a length)."""
    return _shrink(configs_lib.load_file(ROOT / "configs" / "encoder_mlm.py"), mesh)


class Trainer:
    """The loop's pieces without its files: a state on the config's mesh and its step."""

    def __init__(self, config):
        self.resolved = configs_lib.resolve(config)
        self.parallel = loop.make_parallel(self.resolved)
        self.optimizer = make_optimizer(self.resolved.train)
        self.reset()
        self.step = make_train_step(self.state.graphdef, self.optimizer, parallel=self.parallel,
                                    shardings=state_shardings(self.state, self.parallel))
        self.data = configs_lib.make_datasets(self.resolved)[0]

    def reset(self):
        self.state = create_state(lambda: loop.build_model(self.resolved), self.optimizer,
                                  self.parallel)
        return self

    def train(self, start, steps, reshape=None):
        """Losses of steps ``start ...``; ``reshape`` maps each host batch first (e.g. pads
        a seq2seq source to another length than the target's)."""
        state, out = self.state, []
        for i in range(start, start + steps):
            batch = self.data.batch(i) if reshape is None else reshape(self.data.batch(i))
            state.params, state.rest, state.opt_state, m = self.step(*state.arrays(), batch)
            out.append(float(m["loss_sum"] / m["count"]))
        return out


_TRAINERS = {}


def trainer(make, mesh) -> Trainer:
    """A fresh state on ``mesh``, with the step compiled once per (model, mesh)."""
    key = (make.__name__, mesh)
    if key not in _TRAINERS:
        _TRAINERS[key] = Trainer(make(mesh))
        return _TRAINERS[key]
    return _TRAINERS[key].reset()


def _flat(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(params)}


def _specs(params):
    return {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in
            jax.tree_util.tree_leaves_with_path(params)}


def check_train():
    """Losses on every mesh vs one device; shardings and per-device memory."""
    out = {}
    for name, make in (("decoder", decoder), ("seq2seq", seq2seq)):
        for mesh in MESHES:
            t = trainer(make, mesh)
            losses = t.train(0, 3)
            key = f"{name}/{'x'.join(map(str, mesh))}"
            params = t.state.params
            leaves = jax.tree.leaves(params)
            total = sum(x.nbytes for x in leaves)
            local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
            out[key] = {"losses": losses, "memory_fraction": local / total}
            if name == "decoder" and mesh in ((1, 2, 4), (1, 8, 1)):
                out[key]["specs"] = _specs(params)
    return out


def check_checkpoint():
    """Save on (2,2,2) after 2 steps; restore on (1,8,1) and on 1 device; continue."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        saver = trainer(decoder, (2, 2, 2))
        out["before"] = saver.train(0, 2)
        ckpt = Checkpointer(tmp, keep=1, async_save=False)
        state = saver.state
        ckpt.save(2, {"params": state.params, "rest": state.rest, "opt_state": state.opt_state},
                  {"step": 2})
        ckpt.wait()
        saved = _flat(state.params)
        out["continued"] = saver.train(2, 2)
        for mesh in ((1, 8, 1), (1, 1, 1)):
            t = trainer(decoder, mesh)
            s = t.state
            restored, _ = ckpt.restore(2, {"params": s.params, "rest": s.rest,
                                           "opt_state": s.opt_state})
            s.params, s.rest, s.opt_state = (restored["params"], restored["rest"],
                                             restored["opt_state"])
            key = "x".join(map(str, mesh))
            same = all(np.array_equal(a, saved[k]) for k, a in _flat(s.params).items())
            spec = jax.tree.leaves(s.params)[0].sharding
            out[key] = {"identical": same, "losses": t.train(2, 2),
                        "devices": len(spec.device_set)}
        ckpt.close()
    return out


def _relative_error(expected, actual) -> float:
    return max(float(jnp.abs(a - b).max() / jnp.abs(a).max())
               for a, b in zip(expected, actual))


def check_kernels():
    """Flash and the fused CPU kernel (forward and gradients) and paged attention per shard on
    (1,2,4) vs unsharded."""
    from tx.kernels import cpu_attention, masks
    from tx.kernels.flash_attention import registry_attention
    from tx.kernels.paged_attention import paged_attention
    from tx import parallel as parallel_lib
    from tx.parallel import per_shard

    par = parallel_lib.Parallel(parallel_lib.make_mesh(parallel_lib.MeshConfig(1, 2, 4)))
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (4, 16, 8, 8), jnp.float32)  # [B, T, N, H]
    k = jax.random.normal(kk, (4, 16, 4, 8), jnp.float32)  # [B, S, K, H]
    v = jax.random.normal(kv, (4, 16, 4, 8), jnp.float32)
    lengths = jnp.array([16, 9, 12, 3], jnp.int32)
    sharded = per_shard.attention(registry_attention)

    def loss(fn, q, k, v):
        return (fn(q, k, v, mask=masks.Causal(), kv_lengths=lengths) ** 2).sum()

    def run(fn):
        with parallel_lib.use(par):
            return jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(
                q, k, v)
    (l0, g0), (l1, g1) = run(registry_attention), run(sharded)
    out = {"flash_loss": [float(l0), float(l1)],
           "flash_grad_err": _relative_error(g0, g1)}
    # MQA: the one K/V head stays whole on every tensor shard.
    k, v = k[:, :, :1], v[:, :, :1]
    (l0, g0), (l1, g1) = run(registry_attention), run(sharded)
    out["mqa_loss"] = [float(l0), float(l1)]
    out["mqa_grad_err"] = _relative_error(g0, g1)
    (l0, g0), (l1, g1) = run(cpu_attention.attention), run(per_shard.attention(
        cpu_attention.attention))
    out["cpu_loss"] = [float(l0), float(l1)]
    out["cpu_grad_err"] = _relative_error(g0, g1)
    # Paged decode: 4 sequences, pages of 4 tokens, 8 pages each (pool of 32 + spare).
    pages_k = jax.random.normal(kk, (4, 40, 4, 8), jnp.float32)  # [K, P, L, H]
    pages_v = jax.random.normal(kv, (4, 40, 4, 8), jnp.float32)
    tables = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)[::-1]
    q1 = q[:, :2]  # two new tokens per sequence
    plain = jax.jit(lambda *a: paged_attention(*a, mask=masks.Causal()))(
        q1, pages_k, pages_v, tables, lengths + 14)
    with parallel_lib.use(par):
        per = jax.jit(lambda *a: per_shard.paged(paged_attention)(*a, mask=masks.Causal()))(
            q1, pages_k, pages_v, tables, lengths + 14)
    out["paged_err"] = float(jnp.abs(plain - per).max())
    out["paged_spec"] = str(per.sharding.spec)
    out.update(_decode_with_a_sharded_cache(par))
    return out


def _decode_with_a_sharded_cache(mesh):
    """Prefill + one decode step of a GQA decoder with its KV cache split by the rules."""
    from flax import nnx

    from tx import models, parallel as parallel_lib
    from tx.flags import model_config

    cfg = model_config(d_model=32, d_ff=64, num_heads=8, num_kv_heads=4, max_len=16)
    tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, cfg.vocab_size)

    def decode(model, par):
        model.init_cache(batch=4, max_len=16)
        if par is not None:
            parallel_lib.shard_module(model, par)
        graphdef, state = nnx.split(model)

        def step(state, ids):
            model = nnx.merge(graphdef, state)
            with parallel_lib.use(par):
                logits = model(ids)
            return logits, nnx.state(model)
        step = jax.jit(step)
        first, state = step(state, tokens[:, :8])
        second, state = step(state, tokens[:, 8:])
        return jnp.concatenate([first, second], axis=1), nnx.merge(graphdef, state)

    plain, _ = decode(models.build(cfg), None)
    sharded, model = decode(models.build(cfg), mesh)
    cache = model.tower.blocks[0].self_attn.cache
    return {"cache_spec": str(cache.k["x"][...].sharding.spec),
            "decode_err": float(jnp.abs(plain - sharded).max())}


def main(names):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    for name in names:
        result = globals()[f"check_{name}"]()
        print(json.dumps({"check": name, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
