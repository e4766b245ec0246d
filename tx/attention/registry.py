"""Attention backends by name, the order each device tries them in, and the one dispatcher.

A backend is one value (``tx.attention.backends.Backend``) with an optional method per path:
``dense``, ``cached``, ``paged``, ``paged_write``, ``linear``, each taking a typed call record
(``tx.attention.calls``). :func:`register` is the one way to add one (a ``Backend`` value, or a
name and a plain function for a dense-only backend); configs and flags accept exactly the
registered names (:func:`names`), or the values and functions themselves.

An ``implementation`` is an ordered tuple; empty means the device's order (:func:`defaults`:
our Pallas kernels first on a GPU, the fused ``cpu`` kernel first on a CPU). :func:`serve`
tries each backend of the order on a call and returns the first output; a backend that lacks
the path or declines (``Decline``, any ``NotImplementedError``, at trace time) passes it on,
and when none serves, the error lists every backend with its reason. The library never
branches on backend names anywhere else. :func:`recording` and :func:`explain` say which
backend served which path.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Callable, Sequence

import jax

from tx.attention import backends, calls
from tx.attention.backends import Backend, Decline, FunctionBackend  # noqa: F401  (public)

_BACKENDS: dict[str, Backend] = {}

# The order a config that names no implementation gets, per platform: our kernels where they
# run (Pallas lowers through Triton on NVIDIA GPUs; the cpu kernel is built for the host), then
# what XLA ships, then the reference, which serves every case. TPU: our kernels target GPUs.
_DEFAULTS = {"gpu": ("pallas", "cudnn", "xla"), "cpu": ("cpu", "xla"), "tpu": ("xla",)}


class Unserved(NotImplementedError):
    """No backend of an order serves a call; the message lists each one's reason."""


def register(backend: Backend | str, fn: Callable | None = None) -> Backend:
    """Adds (or replaces) a backend: ``register(MyBackend())``, or ``register("name", fn)``
    for a function with the signature of ``kernels.reference.attention`` (dense only)."""
    if isinstance(backend, str):
        if not callable(fn):
            raise ValueError(f"register({backend!r}, fn={fn!r}): give a function with the "
                             "signature of kernels.reference.attention, or a Backend value.")
        backend = FunctionBackend(backend, fn)
    if not isinstance(backend, Backend) or not backend.name or not backend.paths():
        raise ValueError(f"register({backend!r}): give a tx.attention.Backend with a name and "
                         f"at least one of the methods {tuple(calls.PATHS)}.")
    _BACKENDS[backend.name] = backend
    return backend


def names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def defaults(platform: str | None = None) -> tuple[str, ...]:
    """The backend order for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``; None: JAX's
    default backend here): what a config that names no implementation runs."""
    platform = jax.default_backend() if platform is None else platform
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform not in _DEFAULTS:
        raise ValueError(f"platform={platform!r}: use one of {tuple(_DEFAULTS)}.")
    return _DEFAULTS[platform]


def _as_tuple(implementation) -> tuple:
    if isinstance(implementation, (str, Backend)) or callable(implementation):
        return (implementation,)
    return tuple(implementation or ())


def check(implementation) -> tuple:
    """``implementation`` as a tuple of registered names, backends and functions (empty: the
    device's order); a ValueError names an unknown one and the known names."""
    implementation = _as_tuple(implementation)
    for impl in implementation:
        if isinstance(impl, str) and impl not in _BACKENDS:
            raise ValueError(f"implementation={impl!r} is not registered; known: {names()}. "
                             "Register your own with tx.attention.register(MyBackend()), or "
                             "pass the function itself.")
        if not isinstance(impl, (str, Backend)) and not callable(impl):
            raise ValueError(f"implementation={impl!r} is neither a registered name, a "
                             "Backend nor a function.")
    return implementation


def resolve(implementation) -> tuple[Backend, ...]:
    """The backends of an implementation order (empty: the device's)."""
    order = check(implementation) or defaults()
    return tuple(_BACKENDS[i] if isinstance(i, str) else i if isinstance(i, Backend)
                 else FunctionBackend(getattr(i, "__name__", repr(i)), i) for i in order)


def leading(implementation, path: str) -> tuple[Backend, ...]:
    """The backends at the head of the order that have ``path`` (up to the first without)."""
    out = []
    for backend in resolve(implementation):
        if not callable(getattr(backend, path, None)):
            break
        out.append(backend)
    return tuple(out)


# -- dispatch ---------------------------------------------------------------------------------------
_RECORDERS: list[list] = []


@contextlib.contextmanager
def recording():
    """Collects ``(path, backend, method)`` for every call served while active (at trace
    time: wrap the first call of a jitted function)."""
    records: list = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)


def serve(path: str, call, implementation, *, fallback: tuple[str, Callable] | None = None):
    """The output of the first backend of ``implementation`` that serves ``call`` on
    ``path``; ``fallback = (other_path, make_call)`` is how a backend without ``path`` (or
    declining it) may serve it instead (a cache through ``dense`` at its positions)."""
    reasons = []
    for backend in resolve(implementation):
        ways = [(path, lambda: call)] + ([fallback] if fallback else [])
        tried = False
        for method_name, make in ways:
            method = getattr(backend, method_name, None)
            if not callable(method):
                continue
            tried = True
            try:
                out = method(make())
            except NotImplementedError as e:
                reasons.append(f"{backend.name} {method_name}: {e}")
                continue
            for records in _RECORDERS:
                records.append((path, backend.name, method_name))
            return out
        if not tried:
            reasons.append(f"{backend.name}: no {path} path")
    order = tuple(b.name for b in resolve(implementation))
    hint = "" if "xla" in order else " Append 'xla', which serves every dense and linear case."
    raise Unserved(f"no backend of implementation={order} serves this {path} call ("
                   + "; ".join(reasons) + f").{hint}")


_PATH_NAMES = {"dense": "attention", "cached": "contiguous-cache decode",
               "paged": "paged decode", "paged_write": "paged decode", "linear": "linear attention",
               "gated": "gated recurrence", "block": "ring attention blocks"}


def summary(records) -> str:
    """``records`` of :func:`recording` as one line, e.g. ``attention: pallas (12 calls);
    paged decode: pallas (12 calls)``."""
    counts: dict = collections.defaultdict(collections.Counter)
    for path, backend, method in records:
        served = backend if method == path or _PATH_NAMES[method] == _PATH_NAMES[path] \
            else f"{backend} {method}"
        counts[_PATH_NAMES[path]][served] += 1
    return "; ".join(f"{what}: " + ", ".join(f"{b} ({n} call{'s' * (n != 1)})"
                                              for b, n in c.items())
                     for what, c in counts.items()) or "no attention calls"


_SAID: set[str] = set()
_LOG = logging.getLogger("tx.attention")


def announced(fn: Callable, say: Callable[[str], None] | None = None) -> Callable:
    """``fn`` (a jitted step) whose calls that trace say which backend served each path,
    through ``say`` (default: the ``tx.attention`` logger at INFO), each line once per
    process: ``attention: pallas (12 calls); paged decode: pallas (12 calls)``."""
    say = say or _LOG.info

    def call(*args, **kwargs):
        with recording() as records:
            out = fn(*args, **kwargs)
        line = summary(records) if records else None
        if line and line not in _SAID:
            _SAID.add(line)
            say(line)
        return out
    return call


def explain(model, batch) -> dict[str, dict[str, int]]:
    """Which backend serves each attention path of ``model`` on ``batch`` (traced, not
    run): ``{"attention": {"pallas": 12}, ...}``, counted per layer call."""
    from flax import nnx  # noqa: PLC0415  (the registry itself needs no model code)
    graphdef, state = nnx.split(model)
    head = model.config.head

    def loss(state):
        return head.loss(nnx.merge(graphdef, state), batch)[0]

    with recording() as records:
        jax.eval_shape(loss, state)
    out: dict = collections.defaultdict(collections.Counter)
    for path, backend, method in records:
        out[_PATH_NAMES[path]][backend] += 1
    shapes = getattr(model, "attention_shapes", None)
    if callable(shapes):  # layers that see other lengths than the batch's (Funnel's pooling)
        out["attention shapes"] = shapes(batch["inputs"].shape[1])
    return {k: dict(v) for k, v in out.items()}


# -- the old call forms -----------------------------------------------------------------------------
def attend(q, k, v, *, implementation: Sequence = (), **kwargs) -> jax.Array:
    """Dense attention (the arguments of ``kernels.reference.attention``) through the first
    backend of ``implementation`` that serves it."""
    return serve("dense", calls.Dense(q, k, v, **kwargs), implementation)


def linear_attend(q_f, k_f, v, *, causal: bool, segment_ids=None, kv_segment_ids=None,
                  kv_lengths=None, chunk: int, implementation: Sequence = ()):
    """Linear attention ``[B, T, N, H]`` of features ``q_f [B, T, N, F]``, ``k_f [B, S, K, F]``
    through the first backend of ``implementation`` with a linear path that serves it."""
    if kv_segment_ids is not None and kv_segment_ids is not segment_ids and \
            kv_segment_ids.shape != segment_ids.shape:
        raise ValueError("linear attention is self-attention: segment ids of queries and keys "
                         f"must match (got {segment_ids.shape} and {kv_segment_ids.shape}).")
    return serve("linear", calls.Linear(q_f, k_f, v, causal=causal, chunk=chunk,
                                        segment_ids=segment_ids, kv_lengths=kv_lengths),
                 implementation)


for _backend in (backends.Xla(), backends.Cudnn(), backends.Pallas(), backends.Cpu()):
    register(_backend)
