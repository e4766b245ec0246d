"""``summary.md`` of a GPU run from its ``results.jsonl``: the tables of every section and the
issue's targets as a checklist with the ratios measured in the same run.

  python benchmarks/summarize.py OUT_DIR            # writes OUT_DIR/summary.md
  python benchmarks/summarize.py OUT_DIR --print    # and prints it (--brief: the headlines)
  python benchmarks/summarize.py OUT_DIR --archive benchmarks/results   # <h100|h200>-<date>.md

Imports nothing beyond the standard library (``gpu_run.sh`` rewrites the summary after every
section, so a run stopped at its time limit still leaves one), and the sections print their
tables with the functions here.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

TARGETS = {  # name: (bound, direction) as the issue states them
    "flash_fwd": (0.8, ">="), "flash_bwd": (0.7, ">="), "flash_vs_xla": (2.0, ">="),
    "local_window": (1.25, "<="), "paged_copy_pct": (75.0, ">="),
    "paging_overhead_pct": (10.0, "<="), "gqa_vs_mha": (1.0, ">="),
}


def load(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


def _fmt(value, spec: str = "{:.3g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return spec.format(value)
    return str(value)


def _table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(x) for x in line) + " |" for line in lines]
    return "\n".join(out)


def _ok(rows, section, **match) -> list[dict]:
    return [r for r in rows if r.get("section") == section and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


# ------------------------------------------------------------------------------ tables
def calibration_table(rows) -> str:
    cal = [r for r in rows if r.get("section") == "calibrate" and "matmul_tflops" in r]
    if not cal:
        return "(no calibration)"
    r = cal[-1]
    return _table(["device", "driver", "jax", "jaxlib", "cuDNN", f"{r['matmul_n']}^3 bf16 "
                   "matmul TFLOP/s", "copy GB/s", "x+1 GB/s"],
                  [[r.get("device"), r.get("driver"), r.get("jax"), r.get("jaxlib"),
                    r.get("cudnn"), r.get("matmul_tflops"), r.get("copy_gb_per_s"),
                    r.get("add1_gb_per_s")]])


def kernel_tests_table(rows, max_failures: int = 30, max_lines: int = 8) -> str:
    """Per unit (a file or class given to pytest): outcomes, and the tests the GPU run's
    plugin skipped (after a failure in the unit, or past the unit's share of the budget)."""
    rows = [r for r in rows if r.get("section") == "kernel_tests"]
    if not rows:
        return "(kernel tests did not run)"
    per_unit: dict = collections.defaultdict(collections.Counter)
    failures = []
    for r in rows:
        if "nodeid" in r:
            unit = r.get("unit", r["file"])
            per_unit[unit][r["outcome"] if r["when"] == "call" else
                           ("error" if r["outcome"] == "failed" else r["outcome"])] += 1
            if r["outcome"] == "failed":
                failures.append(r)
    units = {r["unit"]: r for r in rows if r.get("event") == "unit"}
    collected = next((r for r in rows if r.get("event") == "collected"), {})
    finished = next((r for r in rows if r.get("event") == "finished"), None)
    lines = []
    for unit in list(dict.fromkeys(collected.get("units", []) + list(per_unit))):
        c, u = per_unit[unit], units.get(unit, {})
        lines.append([unit, u.get("tests"), c["passed"], c["failed"], c["error"], c["skipped"],
                      u.get("skipped_after_failure"), u.get("skipped_share_spent")])
    out = [_table(["unit", "tests", "passed", "failed", "error", "skipped", "after a failure",
                   "share spent"], lines), ""]
    reported = sum(sum(c.values()) for c in per_unit.values())
    state = (f"finished (pytest exit {finished['exitstatus']}"
             f"{', stopped: ' + finished['stopped'] if finished.get('stopped') else ''})"
             if finished else "did not finish (killed at its time limit?)")
    out.append(f"collected {collected.get('tests')}, {reported} reported by test; {state}.")
    for r in failures[:max_failures]:
        out += ["", f"- FAILED `{r['nodeid']}` ({r['when']}, {r['seconds']} s)",
                "  ```", *("  " + ln[:200] for ln in
                           (r.get("message") or "").splitlines()[:max_lines]), "  ```"]
    if len(failures) > max_failures:
        out.append(f"\n({len(failures) - max_failures} more failures in results.jsonl)")
    return "\n".join(out)


def flash_table(rows) -> str:
    rows = [r for r in rows if r.get("section") == "flash" and "impl" in r]
    if not rows:
        return "(no flash rows)"
    lines = []
    for r in rows:
        if r["status"] == "ok":
            lines.append([r["cell"], r["impl"], r["pass"], r["ms"], r["tflops"],
                          r.get("rel_err"), r.get("check", "") + (
                              " " + r["note"] if r.get("note") else "")])
        else:
            lines.append([r["cell"], r["impl"], r["pass"], r["status"], "", "",
                          (r.get("reason") or "")[:90]])
    return _table(["cell", "impl", "pass", "ms", "TFLOP/s (visible pairs)", "rel err",
                   "check / why"], lines)


def _flash_ms(rows) -> dict:
    """{(cell, impl, pass): ms}, with ``bwd`` = fwd+bwd - fwd."""
    ms = {(r["cell"], r["impl"], r["pass"]): r["ms"] for r in _ok(rows, "flash")}
    for (cell, impl, p), t in list(ms.items()):
        if p == "fwd+bwd" and (cell, impl, "fwd") in ms:
            ms[cell, impl, "bwd"] = t - ms[cell, impl, "fwd"]
    return ms


def flash_ratio_table(rows) -> str:
    ms = _flash_ms(rows)
    cells = list(dict.fromkeys(r["cell"] for r in rows if r.get("section") == "flash"
                               and "cell" in r))
    lines = []
    for cell in cells:
        for p in ("fwd", "bwd", "fwd+bwd"):
            tx = ms.get((cell, "tx_pallas", p))
            ratio = [ms[cell, peer, p] / tx if tx and (cell, peer, p) in ms else None
                     for peer in ("cudnn", "jax_xla", "jax_mha")]
            lines.append([cell, p, tx, *ratio])
    return ("Speed of tx_pallas relative to each peer (peer ms / tx ms; > 1: ours faster):\n\n"
            + _table(["cell", "pass", "tx ms", "x cuDNN", "x XLA", "x Pallas mha"], lines))


def paged_table(rows) -> str:
    rows = [r for r in rows if r.get("section") == "paged" and "impl" in r]
    if not rows:
        return "(no paged rows)"
    lines = []
    for r in rows:
        cell = (f"B={r['batch']} ctx={r['context']} N/K={r['num_heads']}/{r['num_kv_heads']} "
                f"L={r['page_size']}")
        if r["status"] == "ok":
            lines.append([cell, r["impl"], r["table"], r["ms"], r["gb_per_s"], r["copy_pct"],
                          r.get("rel_err"), r.get("check")])
        else:
            lines.append([cell, r["impl"], r["table"], r["status"], "", "", "",
                          (r.get("reason") or "")[:90]])
    return _table(["cell", "impl", "table", "ms", "GB/s", "% copy", "rel err", "check / why"],
                  lines)


def e2e_table(rows) -> str:
    rows = [r for r in rows if r.get("section") == "e2e"]
    if not rows:
        return "(no e2e rows)"
    lines = []
    for r in rows:
        if r.get("status") == "ok":
            lines.append([r["order"], ",".join(r["implementation"]), json.dumps(r.get("served")),
                          r["step_ms"], r["tokens_per_s"], r.get("mfu_vs_datasheet"),
                          r.get("mfu_vs_matmul"), r["first_step_s"], r["loss"]])
        elif "order" in r or r.get("status") == "n/a":
            lines.append([r.get("order"), "", "", r.get("status"), "", "", "", "",
                          (r.get("reason") or "")[:90]])
    return _table(["order", "implementation", "served", "step ms", "tokens/s",
                   "MFU (989 TFLOP/s)", "MFU (measured matmul)", "first step s", "loss / why"],
                  lines)


def score_mods_table(rows) -> str:
    rows = [r for r in rows if r.get("section") == "score_mods" and "score_mod" in r]
    if not rows:
        return "(no score-modifier rows)"
    lines = [[r["cell"], r["score_mod"], r["impl"], r["via"], r["pass"],
              r.get("ms") if r["status"] == "ok" else r["status"], r.get("ratio"),
              r.get("max_err"), (r.get("reason") or "")[:60]] for r in rows]
    return _table(["cell", "score_mod", "impl", "via", "pass", "ms", "x base", "max err",
                   "why"], lines)


def crossover_table(rows) -> str:
    ok = _ok(rows, "crossover")
    if not ok:
        return "(no crossover rows)"
    lines = [[r["variant"], r["length"], round(r["train_tokens_per_s"]),
              round(r["decode_tokens_per_s"]), round(r["cache_bytes_per_token"])] for r in ok]
    found = next((r for r in rows if r.get("section") == "crossover" and "crossover" in r), None)
    text = _table(["variant", "T", "train tokens/s", "decode tokens/s", "cache B/token"], lines)
    if found:
        text += (f"\n\nCrossover ({found['versus'][0]} faster per token than "
                 f"{found['versus'][1]} from this length on): {found['crossover']}")
    return text


# ------------------------------------------------------------------------------ targets
def _verdict(name: str, value) -> str:
    if value is None:
        return "no data"
    bound, op = TARGETS[name]
    ok = value >= bound if op == ">=" else value <= bound
    return "met" if ok else f"MISSED by {abs(value - bound):.3g}"


def targets(rows) -> list[tuple[str, str, object, str]]:
    """``(name, description, value, verdict)`` per target of the issue."""
    ms = _flash_ms(rows)
    flash_ok = _ok(rows, "flash")
    headline = next((r["cell"] for r in flash_ok if r["kind"] == "causal"
                     and r["seq_len"] == 8192 and r["head_dim"] == 128), None)

    def ratio(cell, peer, p):
        tx = ms.get((cell, "tx_pallas", p))
        return ms[cell, peer, p] / tx if tx and (cell, peer, p) in ms else None

    fwd = ratio(headline, "cudnn", "fwd") if headline else None
    bwd = ratio(headline, "cudnn", "bwd") if headline else None
    long_cells = {r["cell"] for r in flash_ok if r["seq_len"] >= 4096}
    vs_xla = [ratio(c, "jax_xla", p) for c in long_cells for p in ("fwd", "fwd+bwd")]
    vs_xla = min((x for x in vs_xla if x is not None), default=None)
    local = next((r for r in flash_ok if r["kind"] == "local"), None)
    local_ratio = None
    if local:
        causal = next((r for r in flash_ok if r["kind"] == "causal"
                       and r["seq_len"] == local["seq_len"] and r["batch"] == local["batch"]
                       and r["num_kv_heads"] == local["num_kv_heads"]), None)
        if causal:
            frac = local["density"] / causal["density"]
            values = [ms.get((local["cell"], "tx_pallas", p)) /
                      (ms[causal["cell"], "tx_pallas", p] * frac)
                      for p in ("fwd", "fwd+bwd")
                      if ms.get((local["cell"], "tx_pallas", p))
                      and ms.get((causal["cell"], "tx_pallas", p))]
            local_ratio = max(values) if values else None
    paged = _ok(rows, "paged", impl="tx_pallas")
    shuffled = {(r["batch"], r["context"], r["num_kv_heads"], r["page_size"]): r
                for r in paged if r["table"] == "shuffled"}
    identity = {(r["batch"], r["context"], r["num_kv_heads"], r["page_size"]): r
                for r in paged if r["table"] == "identity"}
    copy_pct = min((r["copy_pct"] for r in shuffled.values() if r["tokens"] >= 65536),
                   default=None)
    overhead = max((100 * (shuffled[k]["ms"] / identity[k]["ms"] - 1)
                    for k in shuffled if k in identity), default=None)
    gqa = None
    for (b, ctx, kh, page), r in shuffled.items():
        mha = shuffled.get((b, ctx, r["num_heads"], page))
        if kh != r["num_heads"] and mha:
            value = r["gb_per_s"] / mha["gb_per_s"]
            gqa = value if gqa is None else min(gqa, value)
    return [
        ("flash_fwd", f"Flash forward, D=128, causal, S=8k: >= 0.8x cuDNN ({headline})",
         fwd, _verdict("flash_fwd", fwd)),
        ("flash_bwd", "Flash backward (fwd+bwd - fwd), same cell: >= 0.7x cuDNN", bwd,
         _verdict("flash_bwd", bwd)),
        ("flash_vs_xla", "Against the XLA path (jax.nn, implementation='xla'), every cell "
         "and pass at S >= 4k: >= 2x (min shown)", vs_xla, _verdict("flash_vs_xla", vs_xla)),
        ("local_window", "Local window 512 at 16k: time <= 1.25x the causal time scaled by "
         "the visible-pair fraction (worse of fwd, fwd+bwd)", local_ratio,
         _verdict("local_window", local_ratio)),
        ("paged_copy_pct", "Paged decode (shuffled tables) at batch x context >= 64k tokens: "
         ">= 75% of the measured copy bandwidth (min shown)", copy_pct,
         _verdict("paged_copy_pct", copy_pct)),
        ("paging_overhead_pct", "Paging overhead, shuffled over identity table: <= 10% (max "
         "shown, %)", overhead, _verdict("paging_overhead_pct", overhead)),
        ("gqa_vs_mha", "Paged decode GQA/MQA bandwidth over MHA's, same batch and context: "
         ">= 1 (min shown)", gqa, _verdict("gqa_vs_mha", gqa)),
    ]


def targets_checklist(rows) -> str:
    out = []
    for _, text, value, verdict in targets(rows):
        box = "x" if verdict == "met" else " "
        out.append(f"- [{box}] {text}: **{_fmt(value)}** ({verdict})")
    return "\n".join(out)


# ------------------------------------------------------------------------------ the file
def sections_table(rows) -> str:
    ends = [r for r in rows if r.get("event") == "section_end"]
    return _table(["section", "rc", "seconds", "budget s", "timed out", "note"],
                  [[r["section"], r.get("rc"), r.get("seconds"), r.get("budget_s"),
                    r.get("timed_out"), r.get("note", "")] for r in ends])


def render(rows) -> str:
    start = next((r for r in rows if r.get("event") == "run_start"), {})
    cal = next((r for r in rows if r.get("section") == "calibrate" and "device" in r), {})
    dry = start.get("dry_run", cal.get("dry_run"))
    out = [f"# GPU run: {cal.get('device', '?')} ({start.get('date', '?')})", ""]
    if dry:
        out += ["**DRY RUN** (CPU, interpret mode, tiny shapes): the numbers below say "
                "nothing about GPU speed.", ""]
    out += [f"Command: `{start.get('command', '?')}`  ", f"Commit: {start.get('git', '?')}  ",
            f"Driver {cal.get('driver', '?')}, JAX {cal.get('jax', '?')}, "
            f"cuDNN {cal.get('cudnn', '?')}", "",
            "## Targets (ratios from this run)", "", targets_checklist(rows), "",
            "## Sections", "", sections_table(rows), "",
            "## Calibration", "", calibration_table(rows), "",
            "## Kernel tests (compiled)", "", kernel_tests_table(rows), "",
            "## Flash attention", "", flash_ratio_table(rows), "", flash_table(rows), "",
            "## Paged decode", "", paged_table(rows), "",
            "## End to end: configs/gpt2_small.py training", "", e2e_table(rows), "",
            "## Score modifiers", "", score_mods_table(rows), "",
            "## Linear-attention crossover", "", crossover_table(rows), ""]
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if skipped:
        out += ["## Left out (budget spent)", ""]
        out += [f"- {r['section']}: {', '.join(map(str, r.get('not_run', [])))[:300]}"
                for r in skipped]
        out.append("")
    warned = [r for r in rows if r.get("kind") == "warning"]
    out += ["## Warnings (deprecations, Triton)", ""]
    out += [f"- {r['section']}: {r['category']}: {r['message'][:300]}" for r in warned] or \
        ["(none recorded)"]
    return "\n".join(out) + "\n"


def brief(rows) -> str:
    """The part of the summary the device tool's output tail (12,000 characters) can hold."""
    start = next((r for r in rows if r.get("event") == "run_start"), {})
    cal = next((r for r in rows if r.get("section") == "calibrate" and "device" in r), {})
    warned = [r for r in rows if r.get("kind") == "warning"]
    skipped = [r for r in rows if r.get("status") == "skipped"]
    parts = [f"# GPU run: {cal.get('device', '?')} ({start.get('date', '?')}); every table "
             "is in summary.md",
             "## Targets (ratios from this run)\n\n" + targets_checklist(rows),
             "## Sections\n\n" + sections_table(rows),
             "## Calibration\n\n" + calibration_table(rows),
             "## Kernel tests (compiled)\n\n" + kernel_tests_table(rows, 5, 3),
             "## Flash attention\n\n" + flash_ratio_table(rows),
             "## End to end\n\n" + e2e_table(rows)]
    if skipped:
        parts.append("## Left out (budget spent)\n\n" + "\n".join(
            f"- {r['section']}: {', '.join(map(str, r.get('not_run', [])))[:200]}"
            for r in skipped))
    parts.append("## Warnings\n\n" + ("\n".join(f"- {r['section']}: {r['message'][:200]}"
                                                for r in warned[:8]) or "(none recorded)"))
    text = "\n\n".join(parts)
    return text if len(text) < 11500 else text[:11500] + "\n(cut: see summary.md)"


def archive_name(rows) -> str:
    """``<h100|h200>-<date>.md`` (another device: its name, lower case, as a slug)."""
    start = next((r for r in rows if r.get("event") == "run_start"), {})
    cal = next((r for r in rows if r.get("section") == "calibrate" and "device" in r), {})
    device = str(cal.get("device") or "unknown").lower()
    kind = next((k for k in ("h100", "h200") if k in device), None) or \
        "".join(c if c.isalnum() else "-" for c in device).strip("-")
    if start.get("dry_run"):
        kind += "-dry-run"
    return f"{kind}-{str(start.get('date', 'undated'))[:10]}.md"


def archive(rows, folder: pathlib.Path) -> pathlib.Path:
    """The summary with the exact command and the raw JSON lines (passed kernel tests are
    counted in the table, not listed), as ``folder/<h100|h200>-<date>.md``."""
    raw = [json.dumps(r, sort_keys=True) for r in rows
           if not (r.get("section") == "kernel_tests" and r.get("outcome") == "passed")]
    path = folder / archive_name(rows)
    path.write_text(render(rows) + "\n## Raw JSON lines\n\n```jsonl\n" + "\n".join(raw)
                    + "\n```\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="the run's OUT folder")
    parser.add_argument("--print", action="store_true", help="print the whole summary")
    parser.add_argument("--brief", action="store_true",
                        help="print the targets, sections and headline tables only")
    parser.add_argument("--archive", type=pathlib.Path, metavar="FOLDER",
                        help="also write FOLDER/<h100|h200>-<date>.md with the raw JSON lines")
    args = parser.parse_args(argv)
    rows = load(args.out / "results.jsonl")
    text = render(rows)
    try:
        (args.out / "summary.md").write_text(text)
    except OSError as e:  # the device tool's files_at is read-only: archive from there
        print(f"summary.md not written: {e}", file=sys.stderr)
    if args.print:
        print(text)
    if args.brief:
        print(brief(rows))
    if args.archive:
        print(f"wrote {archive(rows, args.archive)}")


if __name__ == "__main__":
    main()
