"""Docs cannot drift: every command line and flag spelling shown in README.md and in the module
docstrings of configs/*.py and experiments/*.py runs.

Extracted: fenced shell blocks of the README (backslash-continued lines joined, comments
dropped; the two set-up commands are tests/test_readme.py's), indented command lines of the
docstrings, and inline spans (`...` in the README, ``...`` in docstrings) that are a command
(``python experiments/X.py ...``, ``tx-X ...``, or a bare ``X.py --flag``), a run of flags
(``--config.model.layer_pattern=local,local,local,favor``, ``--work=decode``), a dotted config
spelling (``init.swap.window=128``, ``train.max_nonfinite``) or a model field
(``attention_softcap=50.0``). Placeholders become files made here: ``/tmp/tx/lm`` (and
``/tmp/tx/llama``) is one tiny LLaMA-shaped byte LM trained once for the module, ``/ckpt/llama``
(``/models/tiny-llama``, ``PATH``) a tiny Hugging Face checkpoint with a BPE tokenizer,
``/data/...`` small ArrayRecord files, a saved HF dataset and a text folder, ``notes.txt``,
``docs/``, ``corpus/`` text files in the working directory, ``--step=N`` that run's step;
other ``/tmp/...`` paths are fresh directories, and a documented mesh gets as many fake CPU
devices.

How each runs:
  * train, ablate, evaluate: with ``--print_config`` appended (exit 0, nothing trains);
    evaluate from ``--hf`` (no config to print) runs for real on the tiny checkpoint;
  * generate, visualize_attention, export, kv_memory: for real, at tiny size
    (``--max_new_tokens=2``);
  * bench_*.py, demo.py, bare ``X.py --flag`` mentions and lone script flags: parsed only
    (every flag exists and its value parses): their real runs take minutes
    (tests/test_bench_*.py run each benchmark at a smoke size);
  * config spellings without a script: ``train.py --config=tx:<a built-in config holding the
    fields> ... --print_config`` (``ablate.py`` for ablation configs), passing when one of the
    (at most 3) configs holding the fields takes it; names without a value must be fields of
    some built-in config or flags of some script.

One subprocess runs every script command: it imports what the scripts import once, then forks
a child per command (argv, working directory, stdout and stderr of its own), so a command
costs its own work, not the imports. ``python tests/test_docs_commands.py JOBS RESULTS`` is
that runner.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shlex
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# --------------------------------------------------------------------------- the runner
# The runner process executes this file up to ``if __name__ == "__main__"`` only.


def _script_imports(paths) -> str:
    """The top-level import statements of the scripts, to run once before forking."""
    lines = []
    for path in paths:
        tree = ast.parse(pathlib.Path(path).read_text())
        lines += [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                  and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    return "\n".join(dict.fromkeys(lines))


def _child(job: dict, out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 1
    try:
        import runpy
        import traceback
        os.chdir(job["cwd"])
        os.environ.update(job["env"])  # read when the child's JAX backend starts
        sys.argv = [job["argv0"], *job["args"]]
        if job["mode"] == "parse":
            from absl import app

            def parse_only(main, argv=None, flags_parser=None):
                (flags_parser or app.parse_flags_with_usage)(argv or sys.argv)
                raise SystemExit(0)
            app.run = parse_only
        try:
            if job["module"]:  # a console script: its entry point, as pip's wrapper calls it
                import importlib
                module, func = job["module"].split(":")
                getattr(importlib.import_module(module), func)()
            else:
                sys.path[0] = str(EXPERIMENTS)
                runpy.run_path(job["path"], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the command's failure
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _runner(jobs_file: str, results_file: str) -> None:
    jobs = json.loads(pathlib.Path(jobs_file).read_text())
    exec(_script_imports(sorted({j["path"] for j in jobs})), {})  # noqa: S102
    results = {}
    for i, job in enumerate(jobs):
        if any(results.get(k, {}).get("rc") == 0 for k in job["unless"]):
            results[job["key"]] = {"rc": "skipped", "seconds": 0, "stdout": "", "stderr": ""}
            continue  # an alternative of it passed
        out, err = f"{results_file}.{i}.out", f"{results_file}.{i}.err"
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job, out, err)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - start > job["timeout"]:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = "timeout"
                break
            time.sleep(0.02)
        results[job["key"]] = {"rc": rc, "seconds": round(time.monotonic() - start, 2),
                               "stdout": pathlib.Path(out).read_text(errors="replace"),
                               "stderr": pathlib.Path(err).read_text(errors="replace")}
    pathlib.Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    _runner(*sys.argv[1:])
    sys.exit(0)

# --------------------------------------------------------------------------- extraction
import dataclasses
import fcntl
import shutil
import subprocess
import tomllib

import pytest

SCRIPTS = {p.stem for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_")}
CONSOLE = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
PRINT_CONFIG = {"train", "ablate", "evaluate"}  # take --print_config
REAL = {"generate": ["--max_new_tokens=2"], "visualize_attention": [], "export": [],
        "kv_memory": []}
# Everything else is parsed only: bench_*.py's smallest real runs take minutes; demo.py's
# 12 steps (its fixed 10-step warm-up needs more than 10) take 5-10 s for no new coverage.
SETUP = ("python3 -m venv",)  # tests/test_readme.py checks the set-up commands
# Commands left out on purpose, with the reason (keep short).
SKIP: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Doc:
    """One command or spelling: ``kind`` is ``cmd`` (a script and its argv), ``flags`` (config
    or script flags without a script) or ``names`` (field or flag names without values)."""
    where: str
    kind: str
    text: str
    script: str = ""  # experiments/<script>.py
    console: str = ""  # the console-script name the docs used
    full: bool = True  # python experiments/X.py / tx-X, not a bare X.py mention
    args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.where}:{self.text}"

    @property
    def id(self) -> str:
        return self.key[:150]


def _docstrings():
    for folder in ("configs", "experiments"):
        for path in sorted((ROOT / folder).glob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
            if doc:
                yield f"{folder}/{path.name}", doc


def _words(text: str) -> list[str]:
    return shlex.split(re.sub(r"\\\n\s*", " ", text), comments=True)


def _command(words: list[str]) -> tuple[str, str, bool] | None:
    """(script, console name, full) when ``words`` start a command of experiments/."""
    if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
        stem = pathlib.Path(words[1]).stem
        return (stem, "", True) if stem in SCRIPTS else None
    if words and words[0] in CONSOLE:
        return CONSOLE[words[0]].split(":")[0].split(".")[-1], words[0], True
    if words and words[0].endswith(".py") and pathlib.Path(words[0]).stem in SCRIPTS:
        return pathlib.Path(words[0]).stem, "", False
    return None


def _cmd(where, text, words) -> Doc | None:
    found = _command(words)
    if found is None:
        return None
    script, console, full = found
    args = [w.strip("[]") for w in words[(2 if words[0].startswith("python") else 1):]]
    return Doc(where, "cmd", " ".join(words), script, console, full,
               tuple(a for a in args if a not in ("...", "")))


_FLAG = re.compile(r"--[a-z_][\w.]*(=\S*)?$")
_DOTTED = re.compile(r"[a-z_]+(\.[a-z_]+)+(=\S+)?$")
_FILE_SUFFIXES = {"safetensors", "json", "py", "md", "csv", "png", "txt"}  # model.safetensors
_BARE = re.compile(r"[a-z_]+=\S+$")  # and no quotes: `implementation=("pallas",)` is Python


def _span(where, text, sections, model_fields) -> Doc | None:
    try:
        words = _words(text)
    except ValueError:
        return None
    if not words:
        return None
    cmd = _cmd(where, text, words)
    if cmd is not None:
        # `ablate.py` or `tx-train` alone is a name; `python experiments/X.py` a command
        return cmd if cmd.args or (cmd.full and not cmd.console) else None
    if all(_FLAG.match(w) for w in words):  # (not `--config.model.*`: a section)
        valued = [w for w in words if "=" in w and not w.endswith("=")]
        kind = "flags" if len(valued) == len(words) else "names"
        return Doc(where, kind, text, args=tuple(w.rstrip("=") for w in words))
    if len(words) == 1 and _DOTTED.match(words[0]) and words[0].split(".")[0] in sections \
            and words[0].rsplit(".", 1)[-1] not in _FILE_SUFFIXES:
        word = f"--config.{words[0]}"
        return Doc(where, "flags" if "=" in word else "names", text, args=(word,))
    if len(words) == 1 and _BARE.match(words[0]) and words[0].split("=")[0] in model_fields \
            and not re.search("[\"']", text):
        return Doc(where, "flags", text, args=(f"--config.model.{words[0]}",))
    return None


def extract(sections, model_fields) -> list[Doc]:
    docs: list[Doc] = []
    readme = (ROOT / "README.md").read_text()
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```", readme, re.DOTALL | re.MULTILINE))
    for block in blocks:
        if block.group(1) not in ("", "bash", "sh", "shell"):
            continue
        start = readme.count("\n", 0, block.start(2)) + 1
        body = block.group(2)
        logical, first = "", None
        for n, line in enumerate(body.split("\n"), start):
            first = n if not logical else first
            logical += line + "\n"
            if line.endswith("\\"):
                continue
            text = logical.strip()
            logical = ""
            if not text or text.startswith("#") or text.startswith(SETUP):
                continue
            doc = _cmd(f"README.md:{first}", text, _words(text))
            if doc is not None:
                docs.append(doc)
    prose = readme
    for block in blocks:  # blank out the blocks, keeping line numbers
        prose = prose.replace(block.group(0), "\n" * block.group(0).count("\n"), 1)
    for span in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
        line = prose.count("\n", 0, span.start()) + 1
        doc = _span(f"README.md:{line}", span.group(1), sections, model_fields)
        if doc is not None:
            docs.append(doc)
    for where, text in _docstrings():
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            words = line.split()
            if words and (words[0] in ("python", "python3") or words[0] in CONSOLE):
                doc = _cmd(where, line.strip(), _words(line))
                if doc is not None:
                    docs.append(doc)
        for span in re.finditer(r"``([^`]+)``", text):
            doc = _span(where, span.group(1), sections, model_fields)
            # Commands stand on lines of their own; ``python experiments/train.py ...`` in
            # prose is a shape, but a bare ``X.py --flag`` mention is checked.
            if doc is not None and not (doc.kind == "cmd" and doc.full):
                docs.append(doc)
    return docs


# Collection: the config sections and model fields tell spellings from other dotted names.
from tx.train import configs as configs_lib
from tx.train import describe

_BASE = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
SECTIONS = set(_BASE.keys())
MODEL_FIELDS = {p.split(".", 1)[1] for p, _ in describe.fields(_BASE) if p.startswith("model.")}
DOCS = extract(SECTIONS, MODEL_FIELDS)


def _variants() -> list[str]:
    """Every built-in config and every ``:ARG`` of one the docs name, decoder_lm first."""
    text = (ROOT / "README.md").read_text() + "".join(t for _, t in _docstrings())
    names = {f"{p.stem}" for p in (ROOT / "configs").glob("[a-z]*.py")}
    found = {f"{m[0]}:{m[1]}" for m in re.findall(r"(?:configs/|tx:)(\w+)(?:\.py)?:(\w+)", text)
             if m[0] in names}
    return sorted(names | found, key=lambda v: (not v.startswith("decoder_lm"), v))


def _fields(variant: str) -> set[str]:
    name, _, arg = variant.partition(":")
    config = configs_lib.load_file(ROOT / "configs" / f"{name}.py", arg or None)
    return {p for p, _ in describe.fields(config)}


_DEFINED = {s: set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", (EXPERIMENTS / f"{s}.py")
                              .read_text())) for s in SCRIPTS}
_CLI_FLAGS = {"help", "helpfull", "config"}  # absl's own and config_flags' --config

# --------------------------------------------------------------------------- fixtures
STEP = 2  # the tiny run's last checkpoint
TINY_RUN = ["--config=configs/decoder_lm.py", "--config.model.d_model=32",
            "--config.model.d_ff=64", "--config.model.activation=swiglu",  # LLaMA: exportable
            "--config.model.tie_embeddings=false", "--config.data.seq_len=32",
            f"--config.train.steps={STEP}", "--config.train.batch_size=2",
            "--config.train.warmup_steps=1", f"--config.train.eval_every={STEP}",
            "--config.train.eval_batches=1", f"--config.train.checkpoint_every={STEP}",
            "--config.train.async_checkpoints=false"]


@dataclasses.dataclass(frozen=True)
class Paths:
    tmp: pathlib.Path  # /tmp/..., /shared/... outputs go under tmp/paths
    cwd: pathlib.Path  # the commands' working directory: configs/, examples/ and text files
    run: pathlib.Path  # /tmp/tx/lm, /tmp/tx/llama: the tiny trained run
    hf: pathlib.Path  # /ckpt/llama, /models/tiny-llama: a tiny HF LLaMA with a tokenizer
    hf_bytes: pathlib.Path  # the same without one (byte-level), tried for --config.init.hf=PATH
    data: pathlib.Path  # /data/...: ArrayRecord files, a saved HF dataset, a text folder


def _text_files(paths: Paths) -> None:
    """notes.txt; docs/, notes/, corpus/ and /data/text of 64 files each (1/16 of the documents
    are held out for eval); configs/ and examples/ linked from the repository."""
    text = (ROOT / "README.md").read_text()
    (paths.cwd / "notes.txt").write_text(text[:1500])
    for folder in ("docs", "notes", "corpus", str(paths.data / "text")):
        (paths.cwd / folder).mkdir(parents=True)
        for i in range(64):  # held out: ~4 x 1,200 bytes, over gpt2_small's 1,024 context
            start = 700 * i % len(text)
            (paths.cwd / folder / f"{i}.txt").write_text((text * 2)[start:start + 1200])
    for link in ("configs", "examples"):
        (paths.cwd / link).symlink_to(ROOT / link)


def _datasets(data: pathlib.Path) -> None:
    """/data/train-*.array_record, /data/eval.array_record, /data/my_saved_dataset."""
    import datasets
    from array_record.python import array_record_module
    docs = [f"document {i}: ".encode() + b"abcdefghij" * 8 for i in range(32)]
    for name in ("train-0", "eval"):
        writer = array_record_module.ArrayRecordWriter(str(data / f"{name}.array_record"),
                                                       "group_size:1")
        for doc in docs:
            writer.write(doc)
        writer.close()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [d.decode() for d in docs]}),
                          "validation": datasets.Dataset.from_dict({"text": ["held out"]})}
                         ).save_to_disk(str(data / "my_saved_dataset"))


def _hf_checkpoints(path: pathlib.Path, bytes_path: pathlib.Path) -> None:
    """A tiny LLaMA with a BPE tokenizer (tests/test_pretrained_scripts.py's shape), and the
    same without one."""
    from tests.tx.tokenizer_util import build_bpe
    from tx import models
    from tx.flags import model_config
    from tx.interop import hf
    model = models.build(model_config(
        vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
        activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False,
        norm_eps=1e-5), seed=3)
    hf.save(model, path)
    hf.save(model, bytes_path)
    tok = build_bpe(path.parent / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pathlib.Path(tok) / name, path / name)


def _value(name: str, value: str, p: Paths, records: bool, hf: pathlib.Path) -> str:
    """A documented flag value with its placeholders and paths made real."""
    value = value.replace("$i", "0").replace("<file>", "dilated_mask")
    value = value.replace("tx:NAME[:ARG]", "tx:ablation:uptrain")
    if value in ("N", "i"):  # --num_processes=N --process_id=i
        return {"N": "2", "i": "0"}[value]
    if value == "PATH":
        return str(p.run if name.endswith("workdir") else hf)
    if value == "FILES":
        return "notes.txt"
    if value == "...":  # a dataset's files
        if name.endswith(".path"):
            return str(p.data / "my_saved_dataset")
        return str(p.data / "train-*.array_record") if records else "corpus/"
    if name == "--step":
        return str(STEP)
    if value in ("/tmp/tx/lm", "/tmp/tx/llama"):
        return str(p.run)
    if value in ("/ckpt/llama", "/models/tiny-llama"):
        return str(p.hf)
    if value.startswith("/data/"):
        return str(p.data / value[len("/data/"):])
    if value.startswith(("/tmp/", "/shared/")):
        return str(p.tmp / "paths" / value[1:])
    return value


def _substitute(args, p: Paths, hf: pathlib.Path | None = None) -> list[str]:
    records = any("records" in a or "array_record" in a for a in args)
    return [f"{n}{eq}{_value(n, v, p, records, hf or p.hf)}" if eq else n
            for n, eq, v in (a.partition("=") for a in args)]


def _devices(args) -> dict[str, str]:
    """A documented mesh (``--config.mesh.data=2 ...``, 8 GPUs) gets as many fake CPU
    devices: --print_config checks the mesh against the device count."""
    count = 1
    for a in args:
        if re.match(r"--config\.mesh\.(data|fsdp|tensor|context)=\d+$", a):
            count *= int(a.split("=")[1])
    if count == 1:
        return {}
    return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={count}".strip()}


def _hosts(doc: Doc, args, fields: dict[str, set[str]]) -> list[str]:
    """The built-in configs whose fields include every --config.* field of ``doc``, the
    likeliest first: the docstring's own config, ``pretrained`` for ``init.*``."""
    wanted = {a.partition("=")[0][len("--config."):] for a in args if a.startswith("--config.")}
    own = doc.where.startswith("configs/") and pathlib.Path(doc.where).stem
    first = [v for v in fields if v.split(":")[0] == own]
    if any(w.startswith("init.") for w in wanted):
        first += ["pretrained:text"] if "init.hf" in wanted else ["pretrained"]
    order = first + [v for v in fields if v not in first]
    return [v for v in order if wanted <= fields[v]]


_HOST_DATA = {  # a host config's data, when the spelling does not give it
    "decoder_lm:records": lambda p: [
        f"--config.data.options.paths={p.data}/train-*.array_record",
        f"--config.data.options.eval_paths={p.data}/eval.array_record"],
    "decoder_lm:hf": lambda p: [f"--config.data.options.path={p.data}/my_saved_dataset"],
    "pretrained:text": lambda p: ["--config.data.options.paths=corpus/"],
}


def _job(key, script, args, mode, p: Paths, console="", env=None, unless=()) -> dict:
    """``unless``: keys of jobs whose passing makes this one moot (alternatives)."""
    path = str(EXPERIMENTS / f"{script}.py")
    return {"key": key, "path": path, "args": list(args), "mode": mode, "cwd": str(p.cwd),
            "module": CONSOLE.get(console, ""), "env": env or {}, "argv0": console or path,
            "timeout": 240, "unless": list(unless)}


def _plan(doc: Doc, p: Paths, fields) -> list[dict] | str:
    """The runner jobs of ``doc`` (it passes when one of them does: a spelling without its
    config may take one of a few), or "ok" / why it fails for a name checked here."""
    args = _substitute(doc.args, p)
    if doc.kind == "cmd":
        if not doc.full:  # a bare `X.py --flag` mention
            return [_job(doc.key, doc.script, args, "parse", p)]
        if doc.script in PRINT_CONFIG and not (doc.script == "evaluate"
                                               and any(a.startswith("--hf=") for a in args)):
            return [_job(doc.key, doc.script, args + ["--print_config"], "run", p, doc.console,
                         _devices(args))]
        if doc.script in REAL:
            return [_job(doc.key, doc.script, args + REAL[doc.script], "run", p, doc.console)]
        return [_job(doc.key, doc.script, args, "parse", p, doc.console)]
    config_args = [a for a in args if a.startswith("--config.")]
    names = {a.partition("=")[0][2:] for a in args if not a.startswith("--config")}
    if doc.kind == "names":
        missing = [a for a in config_args if not any(
            a[len("--config."):] in f or any(x.startswith(a[len("--config."):] + ".") for x in f)
            for f in fields.values())]
        missing += [f"--{n}" for n in sorted(names) if not any(
            n in d for d in _DEFINED.values()) and n not in _CLI_FLAGS]
        return f"no built-in config or script has {missing}" if missing else "ok"
    if names:  # script flags: parsed by the script that defines them all
        script = next((s for s in sorted(SCRIPTS) if names <= _DEFINED[s]), None)
        if script is None:
            return f"no script defines all of {sorted(names)}"
        return [_job(doc.key, script, args, "parse", p)]
    if any(a.startswith("--config=") for a in args):
        return [_job(doc.key, "train", args + ["--print_config"], "run", p)]
    hosts = _hosts(doc, args, fields)[:3]
    if not hosts:
        return f"no built-in config has every field of {config_args}"
    jobs = []
    for hf in (p.hf, p.hf_bytes) if "--config.init.hf=PATH" in doc.args else (p.hf,):
        args = _substitute(doc.args, p, hf)
        for host in hosts:
            extra = _HOST_DATA.get(host, lambda _: [])(p)
            if any(a.startswith("--config.init.swap.") for a in args) and not any(
                    a.startswith(("--config.init.hf=", "--config.init.workdir=")) for a in args):
                extra.append(f"--config.init.workdir={p.run}")  # swaps need loaded weights
            script = "ablate" if host.startswith("ablation") else "train"
            jobs.append(_job(f"{doc.key} [tx:{host}, {hf.name}]", script,
                             [f"--config=tx:{host}", *extra, *args, "--print_config"], "run", p,
                             env=_devices(args), unless=[j["key"] for j in jobs]))
    return jobs


def _jobs(p: Paths, plans) -> list[dict]:
    """Every job to run: the tiny run, self-checks, then the plans' (the same argv once)."""
    jobs = [_job("setup: tiny run", "train", TINY_RUN + [f"--workdir={p.run}"], "run", p),
            *(_job(f"self-check: {what}", script, args, mode, p) for what, mode, script, args in (
                ("flag", "parse", "bench_decode", ["--kv_dtype=int8", "--no_such_flag=1"]),
                ("value", "parse", "bench_decode", ["--repeats=many"]),
                ("spelling", "run", "train", ["--config=tx:decoder_lm", "--print_config",
                                              "--config.model.attention=mqa+gqa"])))]
    by_argv = {}
    for plan in plans.values():
        if isinstance(plan, str):
            continue
        for i, job in enumerate(plan):
            sig = json.dumps([job[k] for k in ("path", "module", "args", "mode", "env")]
                             + [len(job["unless"])])
            if sig in by_argv:
                plan[i] = by_argv[sig]
            else:
                by_argv[sig] = job
                jobs.append(job)
    return jobs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every job once per test session: under xdist the first worker to get here runs
    them, the other reads its results."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    tmp = shared / "docs_commands"
    p = Paths(tmp, tmp / "cwd", tmp / "paths" / "tiny_run", tmp / "ckpt" / "llama",
              tmp / "ckpt" / "bytes", tmp / "data")
    with open(shared / "docs_commands.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fields = {v: _fields(v) for v in _variants()}
        plans = {d: _plan(d, p, fields) for d in DOCS if d.key not in SKIP}
        jobs = _jobs(p, plans)
        if not (tmp / "results.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)  # a worker that failed half-way
            p.cwd.mkdir(parents=True)
            _text_files(p)
            _datasets(p.data)
            _hf_checkpoints(p.hf, p.hf_bytes)
            (tmp / "jobs.json").write_text(json.dumps(jobs))
            subprocess.run([sys.executable, __file__, tmp / "jobs.json", tmp / "results.json"],
                           cwd=ROOT, check=True, timeout=900)
    out = json.loads((tmp / "results.json").read_text())
    setup = out["setup: tiny run"]
    assert setup["rc"] == 0, setup["stderr"][-3000:]
    return plans, out


@pytest.mark.parametrize("doc", DOCS, ids=[d.id for d in DOCS])
def test_documented_command_runs(doc, results):
    if doc.key in SKIP:
        pytest.skip(SKIP[doc.key])
    plans, out = results
    plan = plans[doc]
    if isinstance(plan, str):
        assert plan == "ok", f"{doc.where}: `{doc.text}`: {plan}"
        return
    runs = [(job, out[job["key"]]) for job in plan]
    assert any(got["rc"] == 0 for _, got in runs), f"{doc.where}: `{doc.text}`:\n" + "\n".join(
        f"ran as {job['args']} ({job['mode']}): exit {got['rc']}\n{got['stderr'][-2000:]}"
        for job, got in runs)


def test_a_bad_flag_fails_each_way_of_running(results):
    """The runner reports what the scripts refuse: an unknown flag or a bad value when parsed
    only, a refused spelling under --print_config."""
    _, out = results
    for what in ("flag", "value", "spelling"):
        assert out[f"self-check: {what}"]["rc"] not in (0, "skipped"), out[f"self-check: {what}"]
    assert "mqa+gqa" in out["self-check: spelling"]["stderr"]


def test_every_script_and_source_is_covered():
    """The extraction finds what it must: commands of every kind of script, and commands from
    the README and from docstrings."""
    scripts = {d.script for d in DOCS if d.kind == "cmd"}
    assert {"train", "ablate", "evaluate", "generate", "export", "kv_memory",
            "visualize_attention", "bench_decode", "bench_vs_hf"} <= scripts
    assert any(d.where.startswith("README") and d.kind == "flags" for d in DOCS)
    assert any(d.where.startswith("configs/") for d in DOCS)
    assert not any("venv" in d.text for d in DOCS)


def test_readme_model_config_calls_parse():
    """``model_config(...)`` in the README (its Python blocks, which test_readme also runs,
    and its prose) spells a config the way flags do."""
    from tx.flags import model_config
    readme = (ROOT / "README.md").read_text()
    calls = 0
    spans = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    spans += re.findall(r"`(?:tx\.flags\.)?(model_config\([^`]*\))`", readme)
    for block in spans:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "model_config":
                model_config(**{k.arg: ast.literal_eval(k.value) for k in node.keywords})
                calls += 1
    assert calls >= 1
