"""The Python sections of ``benchmarks/gpu_run.sh`` (one process per section).

  python benchmarks/gpu_bench.py SECTION --out DIR --budget SECONDS [--dry-run]

SECTION is one of ``calibrate``, ``flash``, ``paged``, ``e2e``, ``score_mods``, ``crossover``.
Every row goes to ``DIR/results.jsonl`` (flushed as it is made, so a section killed at its
time limit keeps what it measured) and to stdout as a JSON line; each section ends with its
table. A section stops starting new measurements once its budget is nearly spent and says
what it left out (a ``skipped`` row). ``--dry-run``: CPU, the Pallas kernels in interpret
mode, tiny shapes, one or two timed calls: every code path runs, no number means anything.

Timing: a first call compiles and warms up; then repetitions of ``n`` calls dispatched back to
back (``n`` chosen so one repetition takes about 20 ms on the GPU), each repetition waited on
once; the median over repetitions, divided by ``n``. Inputs small enough to sit in L2 are
rotated among copies. Errors are relative to an fp32 reference: ``||out - ref|| / ||ref||``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import dataclasses
import json
import logging
import math
import pathlib
import statistics
import subprocess
import sys
import time
import warnings

import tx_paths  # noqa: F401  (first: the repository root on sys.path, tx.* folder names)
import summarize

import jax
import jax.numpy as jnp
import numpy as np

ROOT = tx_paths.ROOT
SECTIONS = ("calibrate", "flash", "paged", "e2e", "score_mods", "crossover")
DATASHEET_BF16_TFLOPS = 989.4  # H100 / H200 SXM dense bf16, for MFU against the datasheet
BF16_REL_TOL = 2e-2  # a bf16 output further than this from the fp32 reference is a mismatch
L2_ROTATE_BYTES = 256 << 20  # rotate inputs smaller than this (H200's L2 is 60 MB)


# ------------------------------------------------------------------------------ the run
class Run:
    """One section: its rows, its deadline, and whether this is the CPU dry run."""

    def __init__(self, section: str, out: pathlib.Path, budget: float, dry_run: bool):
        self.section, self.out, self.dry_run = section, out, dry_run
        self.start = time.time()
        # Stop starting measurements this long before the hard limit (one may take that long).
        self.deadline = self.start + budget - min(15.0, 0.2 * budget)
        self.jsonl = out / "results.jsonl"
        self.rows: list[dict] = []
        self.interpret = jax.default_backend() != "gpu"
        self._warned: set[str] = set()

    def emit(self, row: dict) -> dict:
        row = {"section": self.section, **row, "t": round(time.time() - self.start, 2)}
        line = json.dumps(row, sort_keys=True, default=_json_default)
        print(line, flush=True)
        with open(self.jsonl, "a") as f:
            f.write(line + "\n")
        self.rows.append(row)
        return row

    def expired(self) -> bool:
        return time.time() > self.deadline

    def skip_rest(self, what: list[str]) -> None:
        self.emit({"status": "skipped", "reason": "section budget spent", "not_run": what})

    def warning(self, kind: str, message: str) -> None:
        key = message[:200]
        if key in self._warned or len(self._warned) >= 20:
            return
        self._warned.add(key)
        self.emit({"kind": "warning", "category": kind, "message": message[:600]})


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def _capture_warnings(run: Run) -> None:
    """Python warnings (once per message) and JAX log warnings about deprecation or Triton
    (JAX 0.11 deprecates Pallas' Triton backend) become ``kind=warning`` rows."""
    warnings.simplefilter("default")
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        run.warning(category.__name__, f"{message} ({filename}:{lineno})")
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning

    class Handler(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if any(w in text.lower() for w in ("deprecat", "triton", "mosaic")):
                run.warning(f"log:{record.name}", text)

    handler = Handler(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    logging.getLogger("jax").addHandler(handler)


def seconds_per_call(fn, arg_sets, *, dry_run: bool, reps: int = 5,
                     rep_seconds: float = 0.02, max_calls: int = 500) -> float:
    """Median seconds per call of ``fn(*args)`` (see the module docstring)."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
    if dry_run:
        reps, rep_seconds = 1, 0.0
    t0 = time.perf_counter()
    out = None
    for args in arg_sets:
        out = fn(*args)
    jax.block_until_ready(out)
    one = (time.perf_counter() - t0) / len(arg_sets)
    n = max(1, min(max_calls, math.ceil(rep_seconds / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


@jax.jit
def _rel_err(out, ref):
    diff = out.astype(jnp.float32) - ref
    return (jnp.linalg.norm(diff.ravel()) / jnp.maximum(jnp.linalg.norm(ref.ravel()), 1e-30),
            jnp.max(jnp.abs(diff)), jnp.all(jnp.isfinite(diff)))


def _check(out, ref) -> dict:
    rel, max_abs, finite = (float(x) for x in _rel_err(out, ref))
    ok = bool(finite) and rel <= BF16_REL_TOL
    return {"rel_err": rel, "max_abs_err": max_abs, "check": "ok" if ok else "MISMATCH"}


def _calibration(run: Run) -> dict:
    """The calibrate section's row, when it ran (else {})."""
    rows = summarize.load(run.jsonl)
    return next((r for r in rows if r.get("section") == "calibrate" and "matmul_tflops" in r),
                {})


def _device() -> dict:
    d = jax.devices()[0]
    return {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__}


# ------------------------------------------------------------------------------ calibrate
def _cudnn_version() -> str | None:
    try:
        from jax._src.lib import cuda_versions
        return str(cuda_versions.cudnn_get_version()) if cuda_versions else None
    except Exception:  # noqa: BLE001 - versions are best effort
        return None


def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = [x.strip() for x in out.splitlines()[0].split(",")] if out else []
    keys = ("gpu_name", "driver", "memory_total", "max_sm_clock", "power_limit")
    return dict(zip(keys, fields))


def calibrate(run: Run) -> None:
    if not run.dry_run and jax.default_backend() != "gpu":
        run.emit({"status": "error", "reason": f"no GPU (backend {jax.default_backend()}): "
                  "run with --dry-run on a CPU"})
        sys.exit(3)
    info = {**_device(), **_nvidia_smi(), "cudnn": _cudnn_version(), "dry_run": run.dry_run}
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    info["bytes_limit"] = stats.get("bytes_limit")
    try:
        (run.out / "env.txt").write_text(jax.print_environment_info(return_string=True))
    except Exception as e:  # noqa: BLE001
        (run.out / "env.txt").write_text(f"print_environment_info failed: {_error(e)}\n")
    n = 256 if run.dry_run else 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    matmul = jax.jit(lambda x, y: x @ y)
    t = seconds_per_call(matmul, [(a, b)], dry_run=run.dry_run, reps=10)
    info.update(matmul_n=n, matmul_ms=round(t * 1e3, 4),
                matmul_tflops=round(2 * n ** 3 / t / 1e12, 2))
    elems = (1 << 20) if run.dry_run else (1 << 28)  # 1 GiB of fp32 on the GPU
    x = jax.random.normal(jax.random.key(3), (elems,), jnp.float32)
    for name, fn in (("copy", jax.jit(lambda v: jnp.copy(v))), ("add1", jax.jit(lambda v: v + 1))):
        t = seconds_per_call(fn, [(x,)], dry_run=run.dry_run, reps=10)
        info[f"{name}_gb_per_s"] = round(2 * x.nbytes / t / 1e9, 1)  # bytes read + written
    # Decode bandwidth is compared with the faster of the two (the harder target).
    info["copy_gb_per_s_ref"] = max(info["copy_gb_per_s"], info["add1_gb_per_s"])
    row = run.emit(info)
    print(summarize.calibration_table([row]))


# ------------------------------------------------------------------------------ flash
@dataclasses.dataclass(frozen=True)
class FlashCell:
    kind: str  # causal, full, local, packed (causal within documents)
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    window: int | None = None  # local: keys per query, the query's own included
    docs: tuple[int, ...] | None = None  # packed: document lengths of every row

    def label(self) -> str:
        extra = {"local": f" W={self.window}", "packed": f" docs={len(self.docs or ())}"}
        return (f"{self.kind}{extra.get(self.kind, '')} B={self.batch} S={self.seq_len} "
                f"N/K={self.num_heads}/{self.num_kv_heads} D={self.head_dim}")

    def visible_pairs(self) -> int:
        """Visible (query, key) pairs of one row and head."""
        s = self.seq_len
        if self.kind == "full":
            return s * s
        if self.kind == "causal":
            return s * (s + 1) // 2
        if self.kind == "local":
            w = self.window
            return w * (w + 1) // 2 + (s - w) * w if s >= w else s * (s + 1) // 2
        return sum(n * (n + 1) // 2 for n in self.docs)

    def fwd_flops(self) -> float:
        """4 * B * N * D per visible pair: Q K^T and P V, 2 FLOPs per multiply-add."""
        return 4.0 * self.batch * self.num_heads * self.head_dim * self.visible_pairs()


def packed_docs(seq_len: int, seed: int = 0) -> tuple[int, ...]:
    """Document lengths filling ``seq_len``: uniform in [S/32, S/4], the last one cut."""
    rng = np.random.default_rng(seed)
    docs, left = [], seq_len
    while left:
        n = int(min(left, rng.integers(max(1, seq_len // 32), max(2, seq_len // 4) + 1)))
        docs.append(n)
        left -= n
    return tuple(docs)


def flash_cells(dry_run: bool) -> list[FlashCell]:
    if dry_run:
        mk = dict(batch=1, seq_len=128, num_heads=4, num_kv_heads=2, head_dim=32)
        return [FlashCell("causal", **mk), FlashCell("local", **mk, window=32),
                FlashCell("packed", **mk, docs=packed_docs(128))]
    tokens = 16384

    def cell(kind, s, **kw):
        return FlashCell(kind, max(1, tokens // s), s, 32, 8, 128, **kw)
    # Most wanted first: the target cells, then the rest of the matrix.
    return [cell("causal", 8192), cell("full", 8192), cell("causal", 16384),
            cell("local", 16384, window=512), cell("causal", 2048),
            cell("packed", 8192, docs=packed_docs(8192)), cell("full", 16384),
            cell("full", 2048)]


FLASH_IMPLS = ("tx_pallas", "cudnn", "jax_xla", "jax_mha")


def _segments(cell: FlashCell):
    if cell.docs is None:
        return None
    ids = np.repeat(np.arange(len(cell.docs), dtype=np.int32), cell.docs)
    return jnp.asarray(np.broadcast_to(ids, (cell.batch, cell.seq_len)))


def _dense_mask(seg):
    """``[B, 1, T, S]`` bool: same document (jax.nn.dot_product_attention's mask)."""
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def flash_impl(name: str, cell: FlashCell, interpret: bool):
    """``fn(q, k, v, seg) -> out``, or raise NotImplementedError(why)."""
    from tx.kernels import flash_attention
    from tx.kernels import masks as masks_lib
    causal = cell.kind in ("causal", "packed", "local")
    window = (cell.window - 1, 0) if cell.kind == "local" else None
    if name == "tx_pallas":
        mask = {"full": masks_lib.Full(), "causal": masks_lib.Causal(),
                "packed": masks_lib.Causal()}.get(cell.kind) or masks_lib.Local(cell.window - 1)

        def fn(q, k, v, seg):
            return flash_attention(q, k, v, mask=mask,
                                   segment_ids=None if seg is None else (seg, seg),
                                   interpret=True if interpret else None)
        return fn
    if name in ("cudnn", "jax_xla"):
        if name == "cudnn" and jax.default_backend() != "gpu":
            raise NotImplementedError("cuDNN needs an NVIDIA GPU")
        impl = "cudnn" if name == "cudnn" else "xla"

        def fn(q, k, v, seg):
            return jax.nn.dot_product_attention(
                q, k, v, mask=None if seg is None else _dense_mask(seg), is_causal=causal,
                local_window_size=window, implementation=impl)
        return fn
    if name == "jax_mha":
        try:
            from jax.experimental.pallas.ops.gpu import attention as jax_attention  # noqa
        except ImportError as e:
            raise NotImplementedError(f"no jax.experimental.pallas.ops.gpu.attention: {e}")
        if cell.kind == "local":
            raise NotImplementedError("mha has no sliding window")
        block = 64 if interpret else 128
        if cell.seq_len % block:
            raise NotImplementedError(f"mha needs S a multiple of {block}")
        kw = {}
        if hasattr(jax_attention, "BlockSizes"):  # the sizes experiments/bench_attention uses
            kw["block_sizes"] = jax_attention.BlockSizes(
                block_q=block, block_k=min(block, 64), block_q_dkv=32, block_kv_dkv=32,
                block_q_dq=32, block_kv_dq=32)
        group = cell.num_heads // cell.num_kv_heads

        def fn(q, k, v, seg):
            if group > 1:  # mha has no GQA: K/V repeated in memory (inside the timing)
                k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
            return jax_attention.mha(q, k, v, seg, sm_scale=cell.head_dim ** -0.5,
                                     causal=causal, interpret=interpret, **kw)
        return fn
    raise ValueError(name)


def _flash_reference(cell: FlashCell, q, k, v, seg):
    """fp32 output, in query chunks of at most 1 GiB of logits."""
    from tx.kernels import masks as masks_lib
    from tx.kernels import reference
    b, t, n, _ = q.shape
    mask = {"full": masks_lib.Full(), "local": masks_lib.Local((cell.window or 1) - 1)
            }.get(cell.kind, masks_lib.Causal())
    chunk = t
    while chunk > 128 and b * n * chunk * t * 4 > (1 << 30):
        chunk //= 2
    seg = seg if seg is not None else jnp.zeros((b, t), jnp.int32)

    @jax.jit
    def part(qc, k32, v32, seg, start):
        c = qc.shape[1]
        q_pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32) + start, (b, c))
        kv_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        q_seg = jax.lax.dynamic_slice_in_dim(seg, start, c, axis=1)
        return reference.attention(qc, k32, v32, mask=mask, segment_ids=(q_seg, seg),
                                   q_positions=q_pos, kv_positions=kv_pos)

    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    precision = getattr(jax, "default_matmul_precision", None)
    with precision("highest") if precision is not None else contextlib.nullcontext():
        outs = [part(q[:, i:i + chunk].astype(jnp.float32), k32, v32, seg, jnp.int32(i))
                for i in range(0, t, chunk)]
    return jnp.concatenate(outs, axis=1)


def _flash_inputs(cell: FlashCell):
    keys = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(cell.dtype)
    q_shape = (cell.batch, cell.seq_len, cell.num_heads, cell.head_dim)
    kv_shape = (cell.batch, cell.seq_len, cell.num_kv_heads, cell.head_dim)
    return (jax.random.normal(keys[0], q_shape, dt), jax.random.normal(keys[1], kv_shape, dt),
            jax.random.normal(keys[2], kv_shape, dt), jax.random.normal(keys[3], q_shape, dt))


def flash(run: Run) -> None:
    cells = flash_cells(run.dry_run)
    for i, cell in enumerate(cells):
        if run.expired():
            run.skip_rest([c.label() for c in cells[i:]])
            break
        q, k, v, do = _flash_inputs(cell)
        seg = _segments(cell)
        base = {"cell": cell.label(), "kind": cell.kind, "batch": cell.batch,
                "seq_len": cell.seq_len, "num_heads": cell.num_heads,
                "num_kv_heads": cell.num_kv_heads, "head_dim": cell.head_dim,
                "dtype": cell.dtype, "window": cell.window,
                "docs": len(cell.docs) if cell.docs else None,
                "density": cell.visible_pairs() / cell.seq_len ** 2, **_device()}
        try:
            ref = _flash_reference(cell, q, k, v, seg)
        except Exception as e:  # noqa: BLE001 - the timings still mean something
            ref = None
            base["ref_error"] = _error(e)
        for name in FLASH_IMPLS:
            if run.expired():
                run.skip_rest([f"{cell.label()} {name}"])
                break
            row = {**base, "impl": name, "interpret": run.interpret and name
                   in ("tx_pallas", "jax_mha")}
            if run.dry_run and i > 0 and name == "jax_mha":
                continue  # the dry run's interpreted mha runs once: it is slow on a CPU
            if name == "jax_mha" and cell.num_heads != cell.num_kv_heads:
                row["note"] = "K/V repeated G times inside the timing (mha has no GQA)"
            try:
                fn = flash_impl(name, cell, run.interpret)
            except NotImplementedError as e:
                for p in ("fwd", "fwd+bwd"):
                    run.emit({**row, "pass": p, "status": "n/a", "reason": str(e)})
                continue
            fwd = jax.jit(fn)

            def loss(q, k, v, seg, do, fn=fn):
                return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * do.astype(jnp.float32))
            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            checked = {}
            for p, f, args, flops in (("fwd", fwd, (q, k, v, seg), cell.fwd_flops()),
                                      ("fwd+bwd", fwd_bwd, (q, k, v, seg, do),
                                       3.5 * cell.fwd_flops())):
                try:
                    if p == "fwd" and ref is not None:
                        checked = _check(f(*args), ref)
                    t = seconds_per_call(f, [args], dry_run=run.dry_run)
                    run.emit({**row, "pass": p, "status": "ok", "ms": round(t * 1e3, 4),
                              "tflops": round(flops / t / 1e12, 2), **checked})
                except Exception as e:  # noqa: BLE001 - a peer that fails is reported
                    run.emit({**row, "pass": p, "status": "n/a", "reason": _error(e),
                              **checked})
        del q, k, v, do, seg
    print(summarize.flash_table(run.rows))


# ------------------------------------------------------------------------------ paged
def paged_shapes(dry_run: bool):
    from tx.experiments import _paged_bench
    shape = _paged_bench.Shape
    if dry_run:
        return [shape(2, 256, 8, 2, 32, 16, "float32"), shape(2, 256, 8, 8, 32, 16, "float32")]
    cells = [(64, 8192, 8, 16), (64, 8192, 8, 64), (16, 4096, 8, 16), (16, 4096, 32, 16),
             (16, 4096, 1, 16), (1, 65536, 8, 16), (64, 8192, 1, 16), (1, 65536, 1, 16),
             (16, 4096, 8, 64), (1, 65536, 8, 64), (64, 8192, 1, 64), (16, 4096, 1, 64),
             (1, 65536, 1, 64)]  # (batch, context, kv heads, page size), most wanted first
    return [shape(b, ctx, 32, kh, 128, page, "bfloat16") for b, ctx, kh, page in cells]


def paged(run: Run) -> None:
    from tx.experiments import _paged_bench
    from tx.kernels import reference
    calib = _calibration(run)
    copy_bw = calib.get("copy_gb_per_s_ref")
    if not copy_bw:
        copy_bw = round(_paged_bench.copy_bandwidth(not run.interpret, 5) / 1e9, 1)
    shapes = paged_shapes(run.dry_run)
    impls = _paged_bench.implementations(run.interpret, split_k=4)
    order = [("tx_pallas", "shuffled"), ("tx_pallas", "identity"), ("jax_pallas", "shuffled"),
             ("xla", "shuffled")]
    for i, shape in enumerate(shapes):
        if run.expired():
            run.skip_rest([str(s) for s in shapes[i:]])
            break
        q, k, v, tables, lengths = _paged_bench.make_inputs(shape)
        identity = jnp.arange(tables.size, dtype=jnp.int32).reshape(tables.shape)
        nbytes = _paged_bench.bytes_read(shape, lengths)
        copies = 1 if run.dry_run else max(1, min(16, math.ceil(L2_ROTATE_BYTES / nbytes)))
        pools = [(k, v)] + [(jnp.array(k, copy=True), jnp.array(v, copy=True))
                            for _ in range(copies - 1)]
        k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
        want = {"shuffled": reference.paged_attention(q.astype(jnp.float32), k32, v32, tables,
                                                      lengths),
                "identity": reference.paged_attention(q.astype(jnp.float32), k32, v32,
                                                      identity, lengths)}
        del k32, v32
        base = {**dataclasses.asdict(shape), "tokens": shape.batch * shape.context,
                "group": shape.num_heads // shape.num_kv_heads, "bytes_read": nbytes,
                "copies": copies, "copy_gb_per_s": copy_bw, **_device()}
        for name, table in order:
            row = {**base, "impl": name, "table": table,
                   "interpret": run.interpret and name != "xla"}
            if name not in impls:
                run.emit({**row, "status": "n/a", "reason": "not available in this JAX"})
                continue
            qq = (q * shape.head_dim ** -0.5).astype(q.dtype) if name == "jax_pallas" else q
            tab = identity if table == "identity" else tables
            arg_sets = [(qq, kk, vv, tab, lengths) for kk, vv in pools]
            try:
                checked = _check(impls[name](*arg_sets[0]), want[table])
                t = seconds_per_call(impls[name], arg_sets, dry_run=run.dry_run)
                gbps = nbytes / t / 1e9
                run.emit({**row, "status": "ok", "ms": round(t * 1e3, 4),
                          "gb_per_s": round(gbps, 1),
                          "copy_pct": round(100 * gbps / copy_bw, 1), **checked})
            except Exception as e:  # noqa: BLE001 - a peer that cannot run says why
                run.emit({**row, "status": "n/a", "reason": _error(e)})
        del q, k, v, pools, want
    print(summarize.paged_table(run.rows))


# ------------------------------------------------------------------------------ e2e
E2E_ORDERS = (("default", ()), ("xla", ("xla",)), ("cudnn,xla", ("cudnn", "xla")))


def e2e(run: Run) -> None:
    try:
        from tx.train import configs as configs_lib  # (needs ml_collections)
        config = configs_lib.load_file(ROOT / "configs" / "gpt2_small.py")
    except ImportError as e:
        run.emit({"status": "n/a", "reason": f"{_error(e)}: carry the wheels "
                  "(benchmarks/fetch_wheels.sh, carry benchmarks/wheels)"})
        return
    from tx import attention, models
    from tx import flags as tx_flags
    from tx.train import optim, step as step_lib
    flags = configs_lib.model_flags(config.model)
    batch_size, seq_len, steps = config.train.batch_size, config.data.seq_len, 10
    if run.dry_run:
        flags = flags.replace(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=32)
        batch_size, seq_len, steps = 2, 32, 2
    calib = _calibration(run)
    tokens = jax.random.randint(jax.random.key(0), (batch_size, seq_len), 0, flags.vocab_size,
                                jnp.int32)
    batch = {"inputs": tokens, "targets": tokens,
             "weights": jnp.ones(tokens.shape, jnp.float32)}
    for i, (name, implementation) in enumerate(E2E_ORDERS):
        if run.expired():
            run.skip_rest([n for n, _ in E2E_ORDERS[i:]])
            break
        row = {"config": "configs/gpt2_small.py", "order": name,
               "implementation": list(implementation) or list(attention.defaults()),
               "d_model": flags.d_model, "num_layers": flags.num_layers,
               "batch": batch_size, "seq_len": seq_len, **_device()}
        try:
            model = models.build(tx_flags.parse(flags.replace(implementation=implementation)))
            row["served"] = attention.explain(model, batch)
            optimizer = optim.make_optimizer(config.train)
            state = step_lib.init_state(model, optimizer)
            train_step = step_lib.make_train_step(state.graphdef, optimizer)
            n_params = sum(x.size for x in jax.tree.leaves(state.params))
            del model
            arrays = state.arrays()
            t0 = time.perf_counter()
            *arrays, metrics = train_step(*arrays, batch)
            jax.block_until_ready(metrics)
            row["first_step_s"] = round(time.perf_counter() - t0, 2)  # compile included
            *arrays, metrics = train_step(*arrays, batch)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(1 if run.dry_run else 3):
                t0 = time.perf_counter()
                for _ in range(steps):
                    *arrays, metrics = train_step(*arrays, batch)
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - t0) / steps)
            t = statistics.median(times)
            # 6 FLOPs per parameter per token, plus attention's 12 * L * d per visible pair
            # of a query (causal: (T + 1) / 2 of them).
            flops_token = 6 * n_params + 6 * flags.num_layers * flags.d_model * (seq_len + 1)
            achieved = flops_token * batch_size * seq_len / t
            row.update(status="ok", params=n_params, step_ms=round(t * 1e3, 3),
                       tokens_per_s=round(batch_size * seq_len / t, 1),
                       model_tflops=round(achieved / 1e12, 2),
                       loss=float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0),
                       flops_per_token=flops_token)
            if calib.get("matmul_tflops"):
                row["mfu_vs_matmul"] = round(achieved / 1e12 / calib["matmul_tflops"], 4)
            if not run.dry_run:
                row["mfu_vs_datasheet"] = round(achieved / 1e12 / DATASHEET_BF16_TFLOPS, 4)
            run.emit(row)
            del arrays, state, metrics
        except Exception as e:  # noqa: BLE001 - an order that fails is reported
            run.emit({**row, "status": "n/a", "reason": _error(e)})
    print(summarize.e2e_table(run.rows))


# ------------------------------------------------------------------------------ score mods
def score_mods(run: Run) -> None:
    from tx.experiments import _score_mod_bench as smb
    from tx.experiments import bench_attention
    from tx.kernels import masks as masks_lib
    if run.dry_run:
        cells, groups, iters = bench_attention.tiny_score_mod_cells(), [("alibi", "softcap50")], 1
    else:
        cells = [bench_attention.Cell(4, 4096, 16, 16, 128, masks_lib.Causal(), "bfloat16")]
        groups, iters = [("alibi", "softcap50"), ("t5_32", "sinks", "score_fn")], 10
    for i, group in enumerate(groups):
        names = [n for n in group if n in smb.NAMES]
        if run.expired():
            run.skip_rest([n for g in groups[i:] for n in g])
            break
        bench_attention.run_score_mods(cells, names, iters, interpret=run.interpret,
                                       emit=lambda line: run.emit(json.loads(line)))
    rows = [r for r in run.rows if "score_mod" in r]
    if rows:
        print(smb.format_table(rows, interpret=run.interpret))


# ------------------------------------------------------------------------------ crossover
def _research_module(name: str):
    """``tx.research.<name>`` (``tx.train.<name>`` before the research modules moved)."""
    for package in ("tx.research", "tx.train"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name not in (package, f"{package}.{name}"):
                raise  # a missing dependency (ml_collections), not a missing module
    raise ModuleNotFoundError(f"neither tx.research.{name} nor tx.train.{name}")


def crossover(run: Run) -> None:
    try:
        from tx.train import configs as configs_lib
        ablation, crossover_lib = _research_module("ablation"), _research_module("crossover")
    except ImportError as e:
        run.emit({"status": "n/a", "reason": f"{_error(e)}: carry the wheels "
                  "(benchmarks/fetch_wheels.sh, carry benchmarks/wheels)"})
        return
    from tx import flags as tx_flags
    from tx import models
    from tx.inference import kv_cache_bytes
    config = configs_lib.load_file(ROOT / "configs" / "ablation.py", "linear")
    section = config.crossover
    versus = tuple(section.versus)
    if run.dry_run:
        lengths, train_tokens, decode_tokens, repeats, max_s = (16,), 32, 4, 1, 0.1
    else:
        lengths, train_tokens, decode_tokens = (2048, 16384, 65536), 16384, 64
        repeats, max_s = 3, 0.5
    variants = {name: crossover_lib.variant_flags(m, lengths)
                for name, m in ablation.variant_models(config, section.model).items()
                if name in versus}
    built = {}
    for i, length in enumerate(lengths):
        if run.expired():
            run.skip_rest([f"T={t}" for t in lengths[i:]])
            break
        for name, flags in variants.items():
            row = {"variant": name, "length": length, "train_tokens": train_tokens,
                   "decode_tokens": decode_tokens, **_device()}
            try:
                if name not in built:
                    cfg = tx_flags.parse(flags)
                    built[name] = (cfg, models.build(cfg))
                cfg, model = built[name]
                train = crossover_lib.train_seconds_per_token(model, length, train_tokens,
                                                              repeats, max_s)
                decode = crossover_lib.decode_seconds_per_token(model, length, decode_tokens,
                                                                repeats, max_s)
                cache = kv_cache_bytes(cfg, 1, length)
                run.emit({**row, "status": "ok", "train_us_per_token": train * 1e6,
                          "train_tokens_per_s": 1 / train, "decode_us_per_token": decode * 1e6,
                          "decode_tokens_per_s": 1 / decode, "cache_bytes": cache,
                          "cache_bytes_per_token": cache / length})
            except Exception as e:  # noqa: BLE001
                run.emit({**row, "status": "n/a", "reason": _error(e)})
    rows = [r for r in run.rows if r.get("status") == "ok" and "variant" in r]
    if rows:
        found = crossover_lib.crossovers(rows, versus)
        run.emit({"crossover": found, "versus": list(versus),
                  "lengths": sorted({r["length"] for r in rows})})
        print(crossover_lib.table(rows, found, versus))


# ------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds for the section")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.section, args.out, args.budget, args.dry_run)
    _capture_warnings(run)
    print(f"== {args.section}: backend={jax.default_backend()} device="
          f"{jax.devices()[0].device_kind} interpret={run.interpret} dry_run={run.dry_run} "
          f"budget={args.budget:.0f}s", flush=True)
    globals()[args.section](run)


if __name__ == "__main__":
    main()
