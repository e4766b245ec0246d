"""Context parallelism on 8 host devices: collective bytes read from the compiled HLO against
the formula, ring steps skipped by the mask, load balance, and per-device memory.

  python benchmarks/context_parallel.py            # T=4096 for the HLO, 8192 for the plans
  python benchmarks/context_parallel.py --t 1024   # quicker
  python benchmarks/context_parallel.py --measure_24gib  # + longest T in 24 GiB (minutes)

Prints three tables and one JSON line (``{"bench": "context_parallel", ...}``). Everything is
compiled, nothing is run: the bytes are those of the collectives in the optimised HLO of one
attention forward + backward (``jax.grad``), per device, each ``while`` body's collectives
counted once per trip; memory is XLA's own per-device buffer assignment (arguments, outputs
and temporaries) for the same program.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

if "jax" not in sys.modules:  # eight host devices, before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tx.kernels import masks, reference  # noqa: E402
from tx.parallel import ring, ulysses  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1}
_COLLECTIVES = ("collective-permute", "all-to-all", "all-gather", "all-reduce")


# ------------------------------------------------------------------------- reading the HLO

def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type: ``f32[1,256,8,64]`` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def collective_bytes(hlo: str, c: int) -> dict[str, int]:
    """Bytes each device sends, per collective kind, over one call of the ENTRY computation.

    A collective-permute sends its operand; an all-to-all keeps 1/c of it; an all-gather
    sends its shard to c-1 peers; an all-reduce (ring) sends 2(c-1)/c of it. Collectives in a
    ``while`` body count once per trip (XLA's ``known_trip_count``)."""
    comps, calls, entry, current = {}, {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current], calls[current] = {}, []
            entry = current if head.group(1) else entry
            continue
        if current is None:
            continue
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(", line)
        if not m:
            continue
        result, op = m.groups()
        base = op.replace("-start", "")
        if base in _COLLECTIVES and not op.endswith("-done"):
            size = _shape_bytes(result)
            if op.endswith("-start"):  # async pair: the result tuple holds input and output
                size //= 2
            factor = {"collective-permute": 1.0, "all-to-all": (c - 1) / c,
                      "all-gather": (c - 1) / c, "all-reduce": 2 * (c - 1) / c}[base]
            comps[current][base] = comps[current].get(base, 0) + size * factor
        trips = 1
        if op == "while":
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            trips = int(n.group(1)) if n else 1
        for callee in re.findall(r"(?:body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)",
                                 line):
            calls[current].append((callee, trips))
        for callee in re.findall(r"branch_computations=\{([^}]*)\}", line):
            for name in callee.split(","):
                calls[current].append((name.strip().lstrip("%"), 1))

    def total(name, seen=()):
        out = dict(comps.get(name, {}))
        for callee, trips in calls.get(name, []):
            if callee in seen:
                continue
            for kind, b in total(callee, seen + (name,)).items():
                out[kind] = out.get(kind, 0) + b * trips
        return out
    return {k: int(v) for k, v in total(entry).items()}


# --------------------------------------------------------------------------- the programs

def _mesh(c):
    return jax.sharding.Mesh(np.array(jax.devices()[:c]), ("context",))


def _grad_program(attn, b, t, n, kh, h):
    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)
    shapes = (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
              jax.ShapeDtypeStruct((b, t, kh, h), jnp.float32),
              jax.ShapeDtypeStruct((b, t, kh, h), jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()


def ring_formula(b, t, kh, h, c, itemsize=4) -> int:
    """Per device, forward + backward: c-1 hops of K/V, then c-1 hops of K/V with dK/dV and
    one last hop of dK/dV home: ``(6c - 4)`` K/V-sized blocks of ``B * T/c * K * H``."""
    block = b * (t // c) * kh * h * itemsize
    return (6 * c - 4) * block


def memory(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def communication(t, c, b=1, n=8, kh=8, h=64):
    mesh = _mesh(c)
    rows = []
    mask = masks.Causal()
    progs = {
        "ring": lambda q, k, v: ring.ring_attention(q, k, v, mesh=mesh, mask=mask,
                                                    layout="zigzag", permuted=True),
        "all_to_all": lambda q, k, v: ulysses.all_to_all_attention(
            q, k, v, mesh=mesh, mask=mask, implementation=("xla",)),
    }
    formulas = {"ring": ring_formula(b, t, kh, h, c),
                "all_to_all": ulysses.collective_bytes(b, t, n, kh, h, c, backward=True)}
    for name, attn in progs.items():
        compiled = _grad_program(attn, b, t, n, kh, h)
        got = collective_bytes(compiled.as_text(), c)
        rows.append({"attention": name, "context": c, "T": t,
                     "hlo_bytes": sum(got.values()), "formula_bytes": formulas[name],
                     "by_kind": got, "memory_per_device": memory(compiled)})
    single = _grad_program(lambda q, k, v: reference.attention(q, k, v, mask=mask), b, t, n,
                           kh, h)
    rows.append({"attention": "one device (xla)", "context": 1, "T": t, "hlo_bytes": 0,
                 "formula_bytes": 0, "by_kind": {}, "memory_per_device": memory(single)})
    return rows


def longest_fit(points, budget=24 * 2**30) -> int:
    """The length at which a quadratic through ``(T, bytes)`` points reaches ``budget``
    (extrapolated from compiled sizes: nothing that large is compiled)."""
    t, m = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    a, b, c0 = np.polyfit(t, m, 2)
    roots = [r.real for r in np.roots([a, b, c0 - budget]) if abs(r.imag) < 1e-6 and r.real > 0]
    return int(min(roots)) if roots else 0


def memory_fit(lengths, c):
    """Per-device bytes of attention forward+backward at ``lengths`` (one device, ring and
    all-to-all at ``c``), and the length each would reach in 24 GiB."""
    out = {}
    for t in lengths:
        for row in communication(t, c):
            out.setdefault(row["attention"], []).append((t, row["memory_per_device"]))
    return {name: {"points": pts, "longest_in_24GiB": longest_fit(pts)}
            for name, pts in out.items()}


def _program(name, t, c, b=1, n=8, kh=8, h=64):
    """The compiled attention forward+backward of one setting at length ``t``."""
    mask = masks.Causal()
    if name == "one device (xla)":
        attn = lambda q, k, v: reference.attention(q, k, v, mask=mask)
    elif name == "ring":
        mesh = _mesh(c)
        attn = lambda q, k, v: ring.ring_attention(
            q, k, v, mesh=mesh, mask=mask, layout="zigzag", permuted=True)
    else:
        mesh = _mesh(c)
        attn = lambda q, k, v: ulysses.all_to_all_attention(
            q, k, v, mesh=mesh, mask=mask, implementation=("xla",))
    return _grad_program(attn, b, t, n, kh, h)


def longest_measured(name, c, budget=24 * 2**30, start=1024, steps=4):
    """The longest length whose compiled program (forward+backward, per device) fits in
    ``budget``: doubling from ``start`` until a length does not fit, then ``steps`` bisections
    between the last fit and the first miss, on multiples of ``start``. Every length reported
    was compiled and its buffer assignment read; nothing is extrapolated.
    Returns ``(longest that fits, its bytes, shortest that does not, its bytes)``."""
    t, fit = start, None
    while True:
        used = memory(_program(name, t, c))
        if used > budget:
            miss = (t, used)
            break
        fit, t = (t, used), 2 * t
    if fit is None:
        return (0, 0, *miss)
    for _ in range(steps):
        mid = (fit[0] + miss[0]) // 2 // start * start
        if mid in (fit[0], miss[0]):
            break
        used = memory(_program(name, mid, c))
        if used > budget:
            miss = (mid, used)
        else:
            fit = (mid, used)
    return (*fit, *miss)


def plans(t, c):
    cases = {"causal": masks.Causal(), "local(T/8)": masks.Local(t // 8),
             "bigbird": masks.BigBird(t // 64)}
    out = []
    for name, mask in cases.items():
        layout = ring.choose_layout(mask, c, t, t)
        s = ring.stats(mask, layout, c, t, t)
        other = ring.stats(mask, "contiguous" if layout == "zigzag" else "zigzag", c, t, t)
        out.append({"mask": name, **s, "other_layout_imbalance": other["imbalance"]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t", type=int, default=4096, help="sequence length of the HLO programs")
    p.add_argument("--plan_t", type=int, default=8192, help="sequence length of the plans")
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--fit", type=int, nargs="*", default=[1024, 2048, 4096],
                   help="lengths whose compiled memory the 24 GiB extrapolation fits")
    p.add_argument("--measure_24gib", action="store_true",
                   help="compile at growing T (doubling, then bisection) for the longest "
                        "length each setting fits in 24 GiB per device (minutes)")
    args = p.parse_args(argv)
    c = args.context
    comm = communication(args.t, c)
    plan = plans(args.plan_t, c)
    print(f"collective bytes per device, attention forward+backward, B=1 N=K=8 H=64 fp32, "
          f"T={args.t}, context={c}")
    print(f"{'attention':<18}{'HLO bytes':>14}{'formula':>14}{'ratio':>8}{'mem/device':>14}")
    for r in comm:
        ratio = r["hlo_bytes"] / r["formula_bytes"] if r["formula_bytes"] else float("nan")
        print(f"{r['attention']:<18}{r['hlo_bytes']:>14,}{r['formula_bytes']:>14,}"
              f"{ratio:>8.3f}{r['memory_per_device'] / 2**20:>11.1f} MiB")
    print(f"\nring plan, T={args.plan_t}, context={c} (chunk pairs of T/{2 * c} tokens)")
    print(f"{'mask':<12}{'layout':<12}{'steps skipped':>14}{'tiles skipped':>14}"
          f"{'imbalance':>10}{'(other layout)':>15}")
    for r in plan:
        print(f"{r['mask']:<12}{r['layout']:<12}{r['skipped_steps']:>14.3f}"
              f"{r['skipped_tiles']:>14.3f}{r['imbalance']:>10.3f}"
              f"{r['other_layout_imbalance']:>15.3f}")
    fit = memory_fit(args.fit, c) if args.fit else {}
    if fit:
        print(f"\nper-device bytes of attention forward+backward (B=1, N=K=8, H=64, fp32) "
              f"at T={args.fit}; the 24 GiB length is a quadratic extrapolation")
        for name, r in fit.items():
            sizes = ", ".join(f"{m / 2**20:.1f}" for _, m in r["points"])
            print(f"{name:<18} MiB: {sizes:<30} longest T in 24 GiB ~ "
                  f"{r['longest_in_24GiB']:,}")
    measured = {}
    if args.measure_24gib:
        print(f"\nlongest T in 24 GiB per device, measured: each T compiled (attention "
              f"forward+backward, causal, B=1 N=K=8 H=64 fp32, context={c}), doubling from "
              "1024 then bisecting")
        for name in ("one device (xla)", "ring", "all_to_all"):
            t_fit, m_fit, t_miss, m_miss = longest_measured(name, 1 if "one" in name else c)
            measured[name] = {"longest_T": t_fit, "bytes": m_fit, "first_miss_T": t_miss,
                              "first_miss_bytes": m_miss}
            print(f"{name:<18} fits T={t_fit:,} ({m_fit / 2**30:.2f} GiB); "
                  f"T={t_miss:,} needs {m_miss / 2**30:.2f} GiB", flush=True)
    print(json.dumps({"bench": "context_parallel", "devices": jax.device_count(),
                      "communication": comm, "plans": plan, "memory_fit": fit,
                      "measured_24GiB": measured}))


if __name__ == "__main__":
    main()
