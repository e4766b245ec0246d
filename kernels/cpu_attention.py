"""Fused attention on the CPU: a C++ kernel (``cpu_attention.cc``) called through XLA's FFI.

XLA runs attention on the CPU as separate dots and elementwise passes over the logits; this
kernel forms each row's logits, softmax and output in one pass that stays in cache, and its
backward recomputes the probabilities row by row (flash attention's scheme, with the row's
log-sum-exp saved by the forward). It computes in fp32 (bf16/fp16 inputs are cast, as the
reference's logits are) and serves every mask at default positions: a row's keys outside
the mask's span are never read (a band's tiles past the diagonal cost nothing), and inside
it a non-band mask's dense map, segment ids and key lengths decide. GQA/MQA by ``N / K``
query heads per K/V head, without copying K/V. A bias, a score modifier or explicit
positions raise ``NotImplementedError``, so the attention registry falls through to the
next implementation (``("cpu", "xla")``). ``cached_attention`` and ``paged_attention`` are
the same kernel over a contiguous and a paged KV cache: new queries at the end of each row's
keys, the pages read in place through the block table.

The library is compiled on first use with the machine's C++ compiler (``$CXX`` or ``g++``,
``-O3 -march=native``) into ``$TX_KERNEL_CACHE`` (default ``~/.cache/tx/kernels``), named by
a hash of the sources, the compiler and its version, the flags, the instruction set
``-march=native`` resolves to on this host (hosts sharing a home never load each other's
builds) and the JAX version, and reused after that; it is written under a temporary name and
renamed, so concurrent builders never corrupt it. Without a compiler, or when the compile
fails, every call declines (xla serves) and one warning per process says so.
``TX_CPU_KERNEL=off`` turns the kernel off (every cpu path declines, nothing is compiled);
``available()`` says whether it can serve here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from tx.kernels import checks
from tx.kernels import masks as masks_lib

_SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
# Vectors, exp and the pool's loop; shapes, visibility and a group of rows' loops.
_HEADERS = tuple(pathlib.Path(__file__).with_name(name) for name in ("cpu_simd.h", "cpu_rows.h"))
_FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-w")
_TARGETS = {"forward": "TxCpuAttentionForward", "backward": "TxCpuAttentionBackward",
            "cached": "TxCpuCachedAttention", "paged": "TxCpuPagedAttention",
            "paged_write": "TxCpuPagedWriteAttention"}
_MAX_HEAD_DIM = 256
# A mask that is not a band reaches the kernel as its dense [T, S] map, a constant in the
# compiled program; past this many entries (16 MiB) the kernel declines and xla evaluates
# the mask's predicate instead.
_MAX_DENSE_MAP = 1 << 24


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TX_KERNEL_CACHE",
                                       pathlib.Path.home() / ".cache" / "tx" / "kernels"))


class BuildError(NotImplementedError):
    """No compiler, or the compile failed: the registry then falls through to the next
    implementation (``("cpu", "xla")``), and a config that names ``("cpu",)`` alone fails with
    this message."""


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"the cpu attention kernel needs a C++ compiler: $CXX={cxx!r} is not "
                         "on PATH (install g++ or set $CXX; or use implementation=('xla',)).")
    return cxx


@functools.cache
def _probe(cxx: str) -> tuple[str, str]:
    """``cxx``'s version and what ``-march=native`` resolves to on this host, from one call
    (``cxx -march=native -E -v -``: the driver prints its version and the cc1 line it runs,
    which spells the target out). Empty strings where the call or the parse fails, and no
    call for a compiler that is not on PATH."""
    if shutil.which(cxx) is None:
        return "", ""
    try:
        done = subprocess.run([cxx, "-march=native", "-E", "-v", "-x", "c++", "-"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return "", ""
    text = done.stdout + "\n" + done.stderr
    version = re.search(r"^.*\b(?:gcc|clang) version \S+.*$", text, re.MULTILINE)
    target = []
    for line in text.splitlines():
        words = line.split()
        if not any(w.endswith(("cc1", "cc1plus")) or w == "-cc1" for w in words):
            continue
        for i, w in enumerate(words):  # g++: -march=znver3 -mavx2 -mno-xop ...
            if w.startswith("-m") and not w.startswith("-mllvm"):
                target.append(w)
            elif w in ("-target-cpu", "-target-feature") and i + 1 < len(words):  # clang
                target.append(f"{w}={words[i + 1]}")
        break
    return (version.group(0).strip() if version else ""), " ".join(target)


def _compiler_version(cxx: str) -> str:
    """``cxx``'s version line (``gcc version 12.2.0 ...``), or its ``--version``'s first line;
    ``"unknown"`` where neither answers."""
    version = _probe(cxx)[0]
    if version or shutil.which(cxx) is None:
        return version or "unknown"
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                              check=False)
        return (done.stdout.strip().splitlines() or ["unknown"])[0]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _native_target(cxx: str) -> str:
    """What ``-march=native`` means to ``cxx`` on this host (``-march=znver3 -mavx2 ...``), or
    this CPU's feature flags (``/proc/cpuinfo``) where the compiler does not say: a library
    built for one CPU is never loaded on another that may lack its instructions."""
    target = _probe(cxx)[1]
    if target:
        return target
    return _cpu_features()


@functools.cache
def _cpu_features() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return "cpu: " + " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"cpu: {platform.machine()} {platform.processor()}"


def library_path(cxx: str) -> pathlib.Path:
    """Where the library built from today's source by ``cxx`` lives in the kernel cache: its
    name hashes the sources, the compiler and its version, the flags, the target
    ``-march=native`` resolves to on this host, and the JAX version."""
    key = hashlib.sha256(_SOURCE.read_bytes() + b"".join(x.read_bytes() for x in _HEADERS)
                         + "\0".join((cxx, _compiler_version(cxx), *_FLAGS,
                                      _native_target(cxx), jax.__version__)).encode())
    return _cache_dir() / f"cpu_attention_{key.hexdigest()[:16]}.so"


_STALE_TEMP_S = 3600  # a temporary library this old is a killed builder's: removed


def build() -> pathlib.Path:
    """Compiles the kernel library (once per ``library_path``) into the kernel cache; returns
    its path. Raises ``BuildError`` when it cannot."""
    cxx = _compiler()
    target = library_path(cxx)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("*.so.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TEMP_S:
                stale.unlink()
    # Compile to a temporary name beside the target and rename (atomic on one file system):
    # concurrent builders (test workers, a cluster's jobs sharing a home) each write their
    # own file, and a reader never sees a half-written library.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, "-iquote", str(_HEADERS[0].parent), "-isystem", jax.ffi.include_dir(),
               str(_SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise BuildError(f"compiling {_SOURCE.name} failed (exit {done.returncode}): "
                             f"{' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from a shared cache's other users
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


_failure: BuildError | None = None  # a failed build is not retried at every trace
_lock = threading.Lock()  # one thread builds; the others wait for its library
_logger = logging.getLogger(__name__)
_SETTING = "TX_CPU_KERNEL"
_COST = ("attention falls back to the xla reference, about 1.3-1.7x slower on CPU. To fix: "
         "install g++ or set $CXX to a C++ compiler; or set TX_CPU_KERNEL=off to choose xla "
         "and silence this warning.")


def _enabled() -> bool:
    """``$TX_CPU_KERNEL``: unset or ``on`` uses the kernel, ``off`` declines every cpu path
    (xla serves). Anything else is a ValueError naming the variable and its choices."""
    value = os.environ.get(_SETTING, "").strip().lower()
    if value not in ("", "on", "off"):
        raise ValueError(f"{_SETTING}={os.environ[_SETTING]!r}: choose 'on' (the default: "
                         "compile and use the cpu attention kernel) or 'off' (leave attention "
                         "on the CPU to xla).")
    return value != "off"


@functools.cache
def _load() -> None:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for kind, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(f"tx_cpu_attention_{kind}",
                                    jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")


def _register() -> None:
    """Loads the library (building it once) or declines (``NotImplementedError``): when
    ``$TX_CPU_KERNEL`` is ``off``, or when the build fails, which logs one warning per process
    with its cost and fix."""
    global _failure
    if not _enabled():
        raise NotImplementedError(f"the cpu attention kernel is off ({_SETTING}=off; unset it "
                                  "or set it to 'on' to use it)")
    with _lock:
        if _failure is not None:
            raise _failure
        try:
            _load()
        except BuildError as e:
            _failure = e
            _logger.warning("tx: the cpu attention kernel is unavailable (%s); %s",
                            str(e).splitlines()[0].rstrip("."), _COST)
            raise


def available() -> tuple[bool, str]:
    """Whether the cpu kernel can serve on this host, and if not why: ``(True, "")`` once its
    library is loaded (built on the first call), else ``(False, reason)`` (``$TX_CPU_KERNEL=off``,
    no compiler, a failed compile; the build failure logs its one warning). A value of
    ``$TX_CPU_KERNEL`` other than on/off raises ValueError."""
    try:
        _register()
    except NotImplementedError as e:
        return False, str(e)
    return True, ""


@functools.lru_cache(maxsize=256)
def _row_ranges(mask: masks_lib.Mask, t: int, s: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Each row's key range ``[T, 2]`` (``j0, j1``) under ``mask`` at bottom-right aligned
    positions, and the mask's dense map ``[T, S]`` (int8) where it is not a band (else None):
    the kernel never reads a key outside a row's range and checks the map inside it."""
    band = mask.band()
    if band is not None:
        pos = np.arange(t) + (s - t)
        lo, hi = band
        j0 = np.zeros(t) if math.isinf(lo) else np.clip(pos + lo, 0, s)
        j1 = np.full(t, s) if math.isinf(hi) else np.clip(pos + hi + 1, 0, s)
        return np.stack([j0, np.maximum(j0, j1)], 1).astype(np.int32), None
    dense = mask.dense(t, s)
    seen = dense.any(1)
    j0 = np.where(seen, dense.argmax(1), 0)
    j1 = np.where(seen, s - dense[:, ::-1].argmax(1), 0)
    return np.stack([j0, j1], 1).astype(np.int32), dense.astype(np.int8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, seen, attrs):
    return _forward(q, k, v, seen, attrs)[0]


def _forward(q, k, v, seen, attrs):
    (b, t, n, _), f32 = q.shape, jnp.float32
    out = (jax.ShapeDtypeStruct((b, t, n, v.shape[3]), f32),
           jax.ShapeDtypeStruct((b, n, t), f32))
    call = jax.ffi.ffi_call("tx_cpu_attention_forward", out, vmap_method="sequential")
    return call(q, k, v, *seen, **dict(attrs))


def _attend_fwd(q, k, v, seen, attrs):
    o, lse = _forward(q, k, v, seen, attrs)
    return o, (q, k, v, seen, o, lse)


def _attend_bwd(attrs, residuals, do):
    q, k, v, seen, o, lse = residuals
    out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call("tx_cpu_attention_backward", out, vmap_method="sequential")
    dq, dk, dv = call(q, k, v, *seen, o, lse, do, **dict(attrs))
    return dq, dk, dv, tuple(None for _ in seen)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _decline(kernel: str, q, unused: dict, reasons: list[str],
             value_dim: int | None = None) -> None:
    """Raises ``NotImplementedError`` naming everything ``kernel`` does not serve: the
    arguments in ``unused`` that are not None, ``reasons``, and the head dim and backend
    limits both entry points share. Returns when there is nothing to decline."""
    reasons = [f"{name} (pass None)" for name, value in unused.items() if value is not None] \
        + reasons
    if q.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}")
    if value_dim is not None and value_dim > _MAX_HEAD_DIM:
        reasons.append(f"value head dim {value_dim} > {_MAX_HEAD_DIM}")
    if jax.default_backend() != "cpu":
        reasons.append(f"backend {jax.default_backend()!r} (it runs on the CPU only)")
    if reasons:
        raise NotImplementedError(f"the {kernel} kernel does not serve: " + ", ".join(reasons))


def _mask_reasons(q, k, mask) -> list[str]:
    if not isinstance(mask, masks_lib.Mask):
        return [f"mask={mask!r} (not a kernels.masks.Mask)"]
    if mask.band() is None and q.shape[1] * k.shape[1] > _MAX_DENSE_MAP:
        return [f"mask={mask!r} over {q.shape[1]} x {k.shape[1]} (not a band: its dense map "
                f"would pass {_MAX_DENSE_MAP} entries)"]
    return []


def attention(q, k, v, *, mask=None, segment_ids=None, kv_lengths=None, scale=None, bias=None,
              q_positions=None, kv_positions=None, block_q=None, score_mod=None):
    """``kernels.reference.attention``'s signature and results, computed in fp32.

    Serves every mask, segment ids and key lengths at default positions; raises
    ``NotImplementedError`` (so the registry tries the next implementation) for a bias, a
    score modifier, explicit positions, head dims past 256, or a backend other than the
    CPU. ``block_q`` is accepted and ignored (the kernel takes its rows four at a time)."""
    del block_q
    checks.check_qkv(q, k, v, value_dim=True)  # values of their own head dim: MLA
    mask = masks_lib.Full() if mask is None else mask
    _decline("cpu attention", q, dict(bias=bias, q_positions=q_positions,
                                      kv_positions=kv_positions, score_mod=score_mod),
             _mask_reasons(q, k, mask), v.shape[-1])
    _register()
    (b, t, _, h), s = q.shape, k.shape[1]
    rows, dense = _row_ranges(mask, t, s)
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else \
        jnp.asarray(kv_lengths, jnp.int32)
    absent = np.zeros((1, 1), np.int32)
    q_seg, kv_seg = (absent, absent) if segment_ids is None else \
        (jnp.asarray(x, jnp.int32) for x in segment_ids)
    seen = (jnp.asarray(rows), lengths,
            jnp.asarray(np.zeros((1, 1), np.int8) if dense is None else dense), q_seg, kv_seg)
    attrs = (("dense", np.int64(dense is not None)), ("packed", np.int64(segment_ids is not None)),
             ("scale", np.float32(h ** -0.5 if scale is None else scale)))
    f32 = jnp.float32
    out = _attend(q.astype(f32), k.astype(f32), v.astype(f32), seen, attrs)
    return out.astype(q.dtype)


def _band_attrs(band) -> dict:
    far = 1 << 40  # "unbounded": the kernel clips it to T + S
    lo, hi = (int(math.copysign(far, x)) if math.isinf(x) else int(x) for x in band)
    return dict(lo=np.int64(lo), hi=np.int64(hi))


def _cached_attrs(q, mask, scale, kernel: str, unused: dict, value_dim=None) -> dict:
    """The band and scale of a cache's call, after declining what the kernel does not serve."""
    mask = masks_lib.Full() if mask is None else mask
    band = mask.band() if isinstance(mask, masks_lib.Mask) else None
    _decline(kernel, q, unused, [] if band is not None else [f"mask={mask!r} (not a band)"],
             value_dim)
    _register()
    return dict(scale=np.float32(q.shape[-1] ** -0.5 if scale is None else scale),
                **_band_attrs(band))


def cached_attention(q, k, v, lengths, *, mask=None, scale=None, score_mod=None,
                     value_dim=None):
    """New queries ``q [B, T, N, H]`` over a contiguous cache's ``k [B, S, K, H]``, ``v [B, S,
    K, Hv]``, of which each row's first ``lengths [B]`` slots are written: query ``i`` sits at
    position ``lengths - T + i`` and sees the keys below ``lengths`` that ``mask`` shows it
    (the cache's ``q_positions`` / ``kv_positions`` in ``kernels.reference.attention``).
    ``value_dim``: v is None and the values are ``k[..., :value_dim]`` (a latent cache, read
    in place). Forward only, fp32 compute. Declines score modifiers, masks that are not a
    band, head dims past 256 and backends other than the CPU."""
    if value_dim is None:
        checks.check_qkv(q, k, v, value_dim=True)
    else:
        checks.check_value_dim(value_dim, k.shape[-1], v)
        checks.check_qkv(q, k, k)
    hv = v.shape[-1] if value_dim is None else value_dim
    attrs = _cached_attrs(q, mask, scale, "cpu cached attention", dict(score_mod=score_mod),
                          hv)
    call = jax.ffi.ffi_call("tx_cpu_attention_cached",
                            jax.ShapeDtypeStruct(q.shape[:3] + (hv,), jnp.float32),
                            vmap_method="sequential")
    f32 = jnp.float32
    k = k.astype(f32)
    v = k if value_dim is not None else v.astype(f32)  # the keys hold the values: one buffer
    out = call(q.astype(f32), k, v, jnp.asarray(lengths, jnp.int32),
               value_dim=np.int64(value_dim or 0), **attrs)
    return out.astype(q.dtype)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mask=None, scale=None,
                    k_scales=None, v_scales=None, score_mod=None, value_dim=None):
    """``kernels.reference.paged_attention``'s signature and results for a decode step or
    prefill over fp32 (or cast) pages ``[K, P, L, H]``, read through the block tables in
    place: no gathered copy of the sequence's K/V. ``value_dim``: no v_pages, the values are
    the first ``value_dim`` columns of the key pages (a latent cache). Forward only. Declines
    (raises ``NotImplementedError``) int8 pages, score modifiers, masks that are not a band,
    head dims past 256 and backends other than the CPU."""
    if value_dim is not None:
        checks.check_value_dim(value_dim, k_pages.shape[-1], v_pages, v_scales)
    hv = v_pages.shape[-1] if value_dim is None else value_dim
    attrs = _cached_attrs(q, mask, scale, "cpu paged attention",
                          dict(k_scales=k_scales, score_mod=score_mod), hv)
    squeeze = q.ndim == 3
    q_btnh = (q[:, None] if squeeze else q).astype(jnp.float32)
    call = jax.ffi.ffi_call("tx_cpu_attention_paged",
                            jax.ShapeDtypeStruct(q_btnh.shape[:3] + (hv,), jnp.float32),
                            vmap_method="sequential")
    k_pages = k_pages.astype(jnp.float32)
    v_pages = k_pages if value_dim is not None else v_pages.astype(jnp.float32)
    out = call(q_btnh, k_pages, v_pages, jnp.asarray(block_tables, jnp.int32),
               jnp.asarray(lengths, jnp.int32), value_dim=np.int64(value_dim or 0), **attrs)
    out = out.astype(q.dtype)
    return out[:, 0] if squeeze else out


def paged_write_attention(q, k_new, v_new, k_pages, v_pages, block_tables, lengths, *,
                          mask=None, scale=None, score_mod=None):
    """``paged_attention`` after storing the step's tokens ``k_new, v_new [B, T, K, H]`` at
    positions ``lengths - T .. lengths - 1`` of each row's pages: returns ``(out, k_pages,
    v_pages)``, the pools updated in place (XLA aliases them to the outputs). One call per
    layer and step where a scatter of K and V into the pools took five small XLA ops. A
    token whose page id lies outside the pool is dropped. fp32 pages only; declines what
    ``paged_attention`` declines."""
    attrs = _cached_attrs(q, mask, scale, "cpu paged attention", dict(score_mod=score_mod))
    if k_pages.dtype != jnp.float32 or v_pages.dtype != jnp.float32:
        raise NotImplementedError(f"the cpu paged kernel stores fp32 pages, not {k_pages.dtype}")
    if k_pages.shape != v_pages.shape:
        raise NotImplementedError(f"the cpu paged writer stores K and V of one head dim, not "
                                  f"{k_pages.shape[-1]} and {v_pages.shape[-1]}")
    squeeze = q.ndim == 3
    f32 = jnp.float32
    q_btnh = (q[:, None] if squeeze else q).astype(f32)
    out = (jax.ShapeDtypeStruct(q_btnh.shape, f32), jax.ShapeDtypeStruct(k_pages.shape, f32),
           jax.ShapeDtypeStruct(v_pages.shape, f32))
    call = jax.ffi.ffi_call("tx_cpu_attention_paged_write", out, vmap_method="sequential",
                            input_output_aliases={3: 1, 4: 2})
    o, k_pages, v_pages = call(q_btnh, k_new.astype(f32), v_new.astype(f32), k_pages, v_pages,
                               jnp.asarray(block_tables, jnp.int32),
                               jnp.asarray(lengths, jnp.int32), **attrs)
    o = o.astype(q.dtype)
    return (o[:, 0] if squeeze else o), k_pages, v_pages
