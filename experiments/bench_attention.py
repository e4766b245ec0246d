"""Attention benchmark: our Pallas flash attention against its peers, side by side.

For every cell (sequence length, head dim, mask, GQA ratio) it times, on the same inputs,
forward and forward+backward of
  * ``tx_pallas``: ``kernels.flash_attention`` (tile skipping, native GQA);
  * ``xla``: ``kernels.reference.attention`` (the grouped einsum);
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')`` where it applies;
  * ``jax_mha``: JAX's own Pallas ``jax.experimental.pallas.ops.gpu.attention.mha`` (MHA only:
    for GQA cells it gets K/V repeated G times, which the JSON line notes).
It prints a table and one JSON line per (cell, implementation, pass) with ms, TFLOP/s
(FLOPs = 4*B*N*T*S*H*density forward, 2.5x that for the backward pass) and the max error
against an fp32 reference. A peer that cannot run a cell reports "n/a" and why.

``--suites=score_mods`` (or ``peers,score_mods``) adds the score-modifier rows
(``experiments/_score_mod_bench.py``): ALiBi, T5 buckets, soft-capping, sinks and a ScoreFn in
the Pallas kernel, timed against the same kernel without a modifier and against the ``xla``
path with the modifier as a dense bias (or as ``score_mod=`` where it has no bias form), on the
same cells with K = N. The rows carry ``score_mod``, ``via`` and ``ratio`` (x base).

  python experiments/bench_attention.py                 # full matrix on a GPU
  python experiments/bench_attention.py --tiny          # tiny matrix, interpret mode (CPU)
  python experiments/bench_attention.py --suites=score_mods --seq_lens=2048,8192 \
      --head_dims=128 --causal=true                     # modifier costs on a GPU
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tx.experiments import _score_mod_bench as smb
from tx.experiments._timing import median_seconds
from tx.kernels import masks as masks_lib
from tx.kernels import reference
from tx.kernels.flash_attention import flash_attention

_TINY = flags.DEFINE_bool("tiny", None, "Tiny matrix in interpret mode (default: iff no GPU).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "1024", "2048", "4096", "8192", "16384"],
                              "Sequence lengths (T = S).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
_GQA = flags.DEFINE_list("gqa_ratios", ["1", "4", "16"], "Query heads per K/V head.")
_CAUSAL = flags.DEFINE_list("causal", ["false", "true"], "Causal or not.")
_WINDOWS = flags.DEFINE_list("local_windows", ["512", "4096"],
                             "Causal sliding windows, run at the longest sequence length.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 16, "Query heads N.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Batch size is max(1, tokens // T).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Dtype.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations per measurement (median).")
_IMPLS = flags.DEFINE_list("impls", ["tx_pallas", "xla", "cudnn", "jax_mha"],
                           "Implementations to compare.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also append the JSON lines to this file.")
_SUITES = flags.DEFINE_list("suites", ["peers"], "peers: the implementations side by side; "
                            "score_mods: the score-modifier rows (MHA cells of the same flags).")
_SCORE_MODS = flags.DEFINE_list("score_mods", list(smb.NAMES), "Modifiers of the score_mods "
                                "suite.")

IMPLS = ("tx_pallas", "xla", "cudnn", "jax_mha")
SUITES = ("peers", "score_mods")
_REF_CHUNK_ELEMS = 1 << 28  # fp32 reference logits per query chunk (1 GiB)

flags.register_validator("suites", lambda v: bool(v) and set(v) <= set(SUITES),
                         f"--suites must be a non-empty subset of {SUITES}")
flags.register_validator("score_mods", lambda v: set(v) <= set(smb.NAMES),
                         f"--score_mods must be a subset of {smb.NAMES}")


@dataclasses.dataclass(frozen=True)
class Cell:
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mask: masks_lib.Mask
    dtype: str

    def label(self) -> str:
        return (f"B={self.batch} T=S={self.seq_len} H={self.head_dim} "
                f"N/K={self.num_heads}/{self.num_kv_heads} {self.mask!r} {self.dtype}")

    def density(self) -> float:
        return masks_lib.density(self.mask, self.seq_len, self.seq_len)

    def fwd_flops(self) -> float:
        b, t, n, h = self.batch, self.seq_len, self.num_heads, self.head_dim
        return 4.0 * b * n * t * t * h * self.density()


def tiny_cells() -> list[Cell]:
    mk = functools.partial(Cell, batch=1, seq_len=128, num_heads=4, head_dim=32,
                           dtype="float32")
    return [mk(num_kv_heads=4, mask=masks_lib.Causal()),
            mk(num_kv_heads=1, mask=masks_lib.Full()),
            mk(num_kv_heads=2, mask=masks_lib.Local(31))]


def tiny_score_mod_cells() -> list[Cell]:
    return [Cell(1, 64, 2, 2, 32, masks_lib.Causal(), "float32")]


def full_cells(seq_lens, head_dims, ratios, causal, windows, num_heads, tokens, dtype):
    cells = []
    for t in seq_lens:
        for h in head_dims:
            for is_causal in causal:
                for g in ratios:
                    if num_heads % g:
                        continue
                    cells.append(Cell(max(1, tokens // t), t, num_heads, num_heads // g, h,
                                      masks_lib.Causal() if is_causal else masks_lib.Full(),
                                      dtype))
    t = max(seq_lens)
    for w in windows:
        for h in head_dims:
            cells.append(Cell(max(1, tokens // t), t, num_heads, num_heads, h,
                              masks_lib.Local(w - 1), dtype))
    return cells


# --- the implementations: fn(q, k, v) -> out, or raise NotImplementedError(reason) ---------------

def _tx_pallas(cell: Cell, interpret: bool) -> Callable:
    return functools.partial(flash_attention, mask=cell.mask,
                             interpret=True if interpret else None)


def _xla(cell: Cell, interpret: bool) -> Callable:
    return functools.partial(reference.attention, mask=cell.mask)


def _band(mask):
    """``(is_causal, local_window)`` for jax.nn.dot_product_attention, or raise."""
    if isinstance(mask, masks_lib.Full):
        return False, None
    if isinstance(mask, masks_lib.Causal):
        return True, None
    if isinstance(mask, masks_lib.Local):
        return False, (mask.left, mask.right)
    raise NotImplementedError(f"mask {mask!r} has no cuDNN equivalent")


def _cudnn(cell: Cell, interpret: bool) -> Callable:
    if jax.default_backend() != "gpu":
        raise NotImplementedError("cuDNN needs an NVIDIA GPU")
    if cell.dtype == "float32":
        raise NotImplementedError("cuDNN flash attention takes bf16/fp16 only")
    is_causal, window = _band(cell.mask)
    return functools.partial(jax.nn.dot_product_attention, is_causal=is_causal,
                             local_window_size=window, implementation="cudnn")


def _jax_mha(cell: Cell, interpret: bool) -> Callable:
    try:
        from jax.experimental.pallas.ops.gpu import attention as jax_attention
    except ImportError as e:  # pragma: no cover
        raise NotImplementedError(f"jax.experimental.pallas.ops.gpu.attention: {e}")
    if not isinstance(cell.mask, (masks_lib.Full, masks_lib.Causal)):
        raise NotImplementedError(f"mha supports causal or full masks only, not {cell.mask!r}")
    block = 128 if not interpret else 64
    if cell.seq_len % block:
        raise NotImplementedError(f"mha needs T, S multiples of its block ({block})")
    group = cell.num_heads // cell.num_kv_heads
    sizes = jax_attention.BlockSizes(block_q=block, block_k=min(block, 64), block_q_dkv=32,
                                     block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)

    def fn(q, k, v):
        if group > 1:  # mha has no GQA: it needs K/V repeated in memory
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return jax_attention.mha(q, k, v, None, sm_scale=cell.head_dim ** -0.5,
                                 causal=isinstance(cell.mask, masks_lib.Causal),
                                 block_sizes=sizes, interpret=interpret)
    return fn


_BUILDERS = {"tx_pallas": _tx_pallas, "xla": _xla, "cudnn": _cudnn, "jax_mha": _jax_mha}


# --- measurement ----------------------------------------------------------------------------------

def _inputs(cell: Cell, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    dtype = jnp.dtype(cell.dtype)
    q = jax.random.normal(keys[0], (cell.batch, cell.seq_len, cell.num_heads, cell.head_dim),
                          dtype)
    kv_shape = (cell.batch, cell.seq_len, cell.num_kv_heads, cell.head_dim)
    k = jax.random.normal(keys[1], kv_shape, dtype)
    v = jax.random.normal(keys[2], kv_shape, dtype)
    do = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, do


def _fp32_reference(cell: Cell, q, k, v, score_mod=None) -> np.ndarray:
    """The fp32 output, in query chunks so long sequences fit in memory."""
    b, t, n, _ = q.shape
    s = k.shape[1]
    chunk = max(1, min(t, _REF_CHUNK_ELEMS // max(1, b * n * s)))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))

    @jax.jit
    def part(q_chunk, start):
        positions = jnp.arange(q_chunk.shape[1], dtype=jnp.int32) + start + (s - t)
        positions = jnp.broadcast_to(positions, (b, q_chunk.shape[1]))
        return reference.attention(q_chunk, k32, v32, mask=cell.mask, q_positions=positions,
                                   score_mod=score_mod)

    outs = [np.asarray(part(q32[:, i:i + chunk], i)) for i in range(0, t, chunk)]
    return np.concatenate(outs, axis=1)


def _time(fn, args, iters: int) -> float:
    """Median milliseconds."""
    return 1e3 * median_seconds(fn, args, iters)


def _max_err(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float32) - ref)))


def _reference(cell: Cell, q, k, v, score_mod=None):
    """``(fp32 output, None)``, or ``(None, why)`` when the reference does not fit."""
    try:
        return _fp32_reference(cell, q, k, v, score_mod), None
    except Exception as e:  # noqa: BLE001 - a reference that does not fit is reported
        return None, f"fp32 reference failed: {type(e).__name__}: {e}"[:200]


def _failed(e: Exception) -> list[dict]:
    return [{"pass": p, "status": "n/a", "reason": f"{type(e).__name__}: {e}"[:300]}
            for p in ("fwd", "fwd+bwd")]


def _measure(fn, inputs, extra, ref, ref_error, fwd_flops, iters, check_dtype=None):
    """One partial row per pass of ``fn(q, k, v, *extra)``. With ``check_dtype`` the output is
    checked against ``ref`` first and, out of tolerance, reported as a mismatch, not timed."""
    q, k, v, do = inputs
    fwd = jax.jit(fn)

    def loss(q, k, v, do, *extra):
        return jnp.sum(fn(q, k, v, *extra).astype(jnp.float32) * do.astype(jnp.float32))
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if check_dtype is not None and ref is not None:
        try:
            err = _max_err(fwd(q, k, v, *extra), ref)
        except Exception as e:  # noqa: BLE001 - an implementation that fails is reported
            return _failed(e)
        ok, bound = smb.within_tolerance(err, ref, check_dtype)
        if not ok:
            return [{"pass": p, "status": "mismatch", "max_err": err,
                     "reason": f"max_err {err:.3g} > {bound:.3g} vs the fp32 reference"}
                    for p in ("fwd", "fwd+bwd")]
    rows = []
    passes = (("fwd", fwd, (q, k, v, *extra), fwd_flops),
              ("fwd+bwd", fwd_bwd, (q, k, v, do, *extra), 3.5 * fwd_flops))
    for pass_, f, args, flops in passes:
        row = {"pass": pass_}
        try:
            ms = _time(f, args, iters)
            row.update(status="ok", ms=round(ms, 4),
                       tflops=round(flops / (ms * 1e-3) / 1e12, 4))
            if pass_ == "fwd":
                row["max_err"] = _max_err(fwd(*args), ref) if ref is not None else None
                if ref_error:
                    row["reason"] = ref_error
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            row.update(status="n/a", reason=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    return rows


def _cell_fields(cell: Cell, device: str) -> dict:
    return {"cell": cell.label(), "batch": cell.batch, "seq_len": cell.seq_len,
            "head_dim": cell.head_dim, "num_heads": cell.num_heads,
            "num_kv_heads": cell.num_kv_heads, "mask": repr(cell.mask), "dtype": cell.dtype,
            "density": cell.density(), "device": device, "jax_version": jax.__version__}


def bench_cell(cell: Cell, impls, iters: int, interpret: bool, device: str) -> list[dict]:
    inputs = _inputs(cell)
    ref, ref_error = _reference(cell, *inputs[:3])
    rows = []
    for impl in impls:
        base = {**_cell_fields(cell, device), "impl": impl}
        try:
            fn = _BUILDERS[impl](cell, interpret)
        except NotImplementedError as e:
            for pass_ in ("fwd", "fwd+bwd"):
                rows.append({**base, "pass": pass_, "status": "n/a", "reason": str(e)})
            continue
        if impl == "jax_mha" and cell.num_heads != cell.num_kv_heads:
            base["note"] = "K/V repeated G times (mha has no GQA)"
        for row in _measure(fn, inputs, (), ref, ref_error, cell.fwd_flops(), iters):
            rows.append({**base, **row})
    return rows


def _xla_bias(q, k, v, bias, *, mask):
    return reference.attention(q, k, v, mask=mask, bias=bias)


def _xla_variant(cell: Cell, mod):
    """``(via, fn, extra args)`` of the xla row: a dense bias where the modifier is one."""
    try:
        bias = smb.dense_bias(mod, cell.seq_len, cell.seq_len)
    except NotImplementedError:
        return "score_mod", functools.partial(reference.attention, mask=cell.mask,
                                              score_mod=mod), ()
    return "dense_bias", functools.partial(_xla_bias, mask=cell.mask), (bias,)


def bench_score_mods(cell: Cell, names, iters: int, interpret: bool,
                     device: str) -> list[dict]:
    """The score_mods suite on one cell: per modifier, the kernel with it and the xla path,
    each with ``ratio`` = its ms over the kernel's without a modifier (same pass)."""
    inputs = _inputs(cell)
    flops = cell.fwd_flops()
    base = {**_cell_fields(cell, device), "suite": "score_mods", "interpret": interpret}
    plain = _measure(_tx_pallas(cell, interpret), inputs, (), *_reference(cell, *inputs[:3]),
                     flops, iters, check_dtype=cell.dtype)
    rows = [{**base, "impl": "tx_pallas", "score_mod": "none", "via": "none", **r}
            for r in plain]
    base_ms = {r["pass"]: r.get("ms") for r in plain}
    mods = smb.modifiers(cell.num_heads)
    for name in names:
        mod = mods[name]
        ref = _reference(cell, *inputs[:3], mod)
        kernel = functools.partial(flash_attention, mask=cell.mask, score_mod=mod,
                                   interpret=True if interpret else None)
        variants = [("tx_pallas", "score_mod", kernel, ())]
        try:
            variants.append(("xla", *_xla_variant(cell, mod)))
        except Exception as e:  # noqa: BLE001 - a bias that does not fit is reported
            rows += [{**base, "impl": "xla", "score_mod": name, "via": "dense_bias", **r}
                     for r in _failed(e)]
        for impl, via, fn, extra in variants:
            for r in _measure(fn, inputs, extra, *ref, flops, iters, check_dtype=cell.dtype):
                if r.get("ms") and base_ms.get(r["pass"]):
                    r["ratio"] = round(r["ms"] / base_ms[r["pass"]], 3)
                rows.append({**base, "impl": impl, "score_mod": name, "via": via, **r})
    return rows


def _collect(cells, rows_of, emit) -> list[dict]:
    device = jax.devices()[0].device_kind
    rows = []
    for cell in cells:
        for row in rows_of(cell, device):
            emit(json.dumps(row, sort_keys=True))
            rows.append(row)
    return rows


def run(cells, impls=IMPLS, iters: int = 10, interpret: bool = False, emit=print) -> list[dict]:
    """Benchmarks every cell; emits one JSON line per row and returns the rows."""
    return _collect(cells, lambda c, d: bench_cell(c, impls, iters, interpret, d), emit)


def run_score_mods(cells, names=smb.NAMES, iters: int = 10, interpret: bool = False,
                   emit=print) -> list[dict]:
    """The score_mods suite on every cell; emits and returns its rows like ``run``."""
    return _collect(cells, lambda c, d: bench_score_mods(c, names, iters, interpret, d), emit)


def format_table(rows) -> str:
    header = f"{'cell':<70} {'impl':<10} {'pass':<8} {'ms':>10} {'TFLOP/s':>9} {'max_err':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] == "ok":
            err = r.get("max_err")
            err = f"{err:9.2e}" if err is not None else f"{'':>9}"
            lines.append(f"{r['cell']:<70} {r['impl']:<10} {r['pass']:<8} {r['ms']:>10.3f} "
                         f"{r['tflops']:>9.2f} {err}")
        else:
            lines.append(f"{r['cell']:<70} {r['impl']:<10} {r['pass']:<8} "
                         f"{'n/a':>10} ({r['reason'][:60]})")
    return "\n".join(lines)


def main(argv):
    del argv
    tiny = _TINY.value if _TINY.value is not None else jax.default_backend() != "gpu"
    if tiny:
        cells, mod_cells, iters = tiny_cells(), tiny_score_mod_cells(), 1
    else:
        seq_lens, head_dims = [int(x) for x in _SEQ_LENS.value], [int(x) for x in
                                                                  _HEAD_DIMS.value]
        causal = [x.lower() in ("1", "true") for x in _CAUSAL.value]
        cells = full_cells(seq_lens, head_dims, [int(x) for x in _GQA.value], causal,
                           [int(x) for x in _WINDOWS.value], _NUM_HEADS.value, _TOKENS.value,
                           _DTYPE.value)
        mod_cells = full_cells(seq_lens, head_dims, [1], causal, [], _NUM_HEADS.value,
                               _TOKENS.value, _DTYPE.value)
        iters = _ITERS.value
    out = open(_JSON_OUT.value, "a") if _JSON_OUT.value else None

    def emit(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    suites = _SUITES.value
    rows = run(cells, _IMPLS.value, iters, interpret=tiny, emit=emit) if "peers" in suites else []
    mod_rows = (run_score_mods(mod_cells, _SCORE_MODS.value, iters, interpret=tiny, emit=emit)
                if "score_mods" in suites else [])
    if "peers" in suites:
        print(format_table(rows))
    if mod_rows:
        print(smb.format_table(mod_rows, interpret=tiny))
    print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} "
          f"backend={jax.default_backend()} interpret={tiny}")
    if out:
        out.close()


if __name__ == "__main__":
    app.run(main)
