"""The command-line edge of the experiment scripts (experiments/_cli.py): ``--print_config``,
one-line refusals of unknown ``--config.*`` fields and built-in config names, tracebacks for
errors that are not flag errors, console scripts' ``--help`` and ``--config=tx:NAME``.

Scripts run in subprocesses (each one a few seconds of imports, nothing compiles); the name
matching and the package list are checked in-process."""

import pathlib
import subprocess
import sys
import tomllib

import pytest
import setuptools

from tx.experiments import _cli
from tx.train import configs as configs_lib
from tx.train import describe

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def run(*cmd, cwd=ROOT):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=240, check=False)


def script(name):
    return [sys.executable, ROOT / "experiments" / f"{name}.py"]


def test_print_config_from_any_directory_shows_the_values_and_every_field(tmp_path):
    out = run(*script("train"), "--config=tx:decoder_lm", "--config.train.steps=7",
              "--print_config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no workdir, nothing written
    text = out.stdout
    assert text.startswith("model resolves to:") and "attention = AttentionConfig(" in text
    assert "  attention backends here: cpu, xla (the device's order" in text  # a CPU here
    config = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")
    lines = {line.split("=", 1)[0].strip(): line for line in text.splitlines()
             if line.startswith("  --config.")}
    assert {f"--config.{path}" for path, _ in describe.fields(config)} == set(lines)
    assert lines["--config.train.steps"].split("#")[0].strip() == "--config.train.steps=7"
    assert "# optimizer updates" in lines["--config.train.steps"]
    assert "# data-parallel degree" in lines["--config.mesh.data"]
    model_docs = describe.docs()
    if model_docs.get("model.num_kv_heads"):  # tx.flags.fields() documents the model fields
        assert model_docs["model.num_kv_heads"] in lines["--config.model.num_kv_heads"]


def test_ablate_print_config_shows_each_variant_of_its_default_config():
    out = run(*script("ablate"), "--print_config", "--config.sweep.choices=mha,mqa")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model resolves to:" in out.stdout
    assert "model.attention=mqa (changes from the base model):\n  attention.num_kv_heads = 1" \
        in out.stdout
    assert "--config.sweep.choices='mha,mqa'" in out.stdout


def test_evaluate_print_config_needs_no_workdir():
    out = run(*script("evaluate"), "--config=tx:mqar", "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model resolves to:" in out.stdout and "--config.data.name='mqar'" in out.stdout


@pytest.mark.parametrize("flag,line", [
    ("--config.train.lr=1",
     "error: --config.train.lr: no such field; did you mean: learning_rate?"),
    ("--config=tx:nope", ("error: --config=tx:nope: no built-in config 'nope'; built-in: "
                          "tx:ablation, tx:decoder_lm, ")),
])
def test_unknown_names_are_refused_in_one_line(flag, line, tmp_path):
    args = ["--config=tx:mqar", flag] if flag.startswith("--config.") else [flag]
    out = run(*script("train"), *args, f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(line), out.stderr
    assert "\\n" not in out.stderr and "\\'" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_a_config_files_own_key_error_shows_its_traceback(tmp_path):
    config = tmp_path / "my_config.py"
    config.write_text("def _targets(d):\n    return d['targets']\n\n\n"
                      "def get_config():\n    return _targets({})\n")
    out = run(*script("train"), f"--config={config}", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 1
    assert "has no field" not in out.stderr and "no such field" not in out.stderr
    assert out.stderr.startswith("Traceback (most recent call last):")
    assert f'File "{config}", line 2, in _targets' in out.stderr
    assert out.stderr.strip().endswith("KeyError: 'targets'")
    assert "absl" not in out.stderr and "ml_collections" not in out.stderr


def test_console_script_help_is_the_scripts_help():
    entry = BIN / "tx-evaluate"
    if not entry.exists():
        pytest.skip("tx is not pip-installed in this environment (no console scripts)")
    installed = run(entry, "--help")
    direct = run(*script("evaluate"), "--help")
    assert installed.returncode == direct.returncode == 1  # absl's --help exit
    assert "--[no]print_config:" in direct.stdout and "--hf:" in direct.stdout
    # The same text but for the flags' heading, which names the program.
    assert installed.stdout.replace(f"{entry}:", "<program>:") == \
        direct.stdout.replace(f"{ROOT / 'experiments' / 'evaluate.py'}:", "<program>:")


# -- in-process --------------------------------------------------------------------------------
@pytest.mark.parametrize("typed,meant", [
    ("lr", ["learning_rate"]), ("num_kv_head", ["num_kv_heads"]), ("stpes", ["steps"]),
    ("batch", ["batch_size"]), ("zzz", []),
])
def test_nearest_names(typed, meant):
    names = list(configs_lib.TRAIN) + ["num_kv_heads", "num_heads"]
    assert _cli.nearest(typed, names)[:len(meant)] == meant
    if not meant:
        assert _cli.nearest(typed, names) == []


def test_unknown_field_messages():
    config = configs_lib.load_file(ROOT / "configs" / "mqar.py")
    assert _cli.unknown_field(config, "train.learning_rate") is None
    assert _cli.unknown_field(config, "model.task.x") == \
        "--config.model.task.x: no such field; config.model.task is a str value, not a section."
    whole = _cli.unknown_field(config, "mesh.zzz")
    assert whole == "--config.mesh.zzz: no such field; the fields of config.mesh are: " \
        "context, context_attention, data, fsdp, tensor."
    empty = configs_lib.load_file(ROOT / "configs" / "decoder_lm.py")  # built-in text: none
    assert _cli.unknown_field(empty, "data.options.nope") == (
        "--config.data.options.nope: no such field; config.data.options has no fields in this "
        "config (a dataset option must be one its dataset takes).")


def test_every_train_mesh_init_and_inference_field_has_a_doc():
    config = configs_lib.load_file(ROOT / "configs" / "mqar.py")
    undocumented = [path for path, _ in describe.fields(config)
                    if not path.startswith(("model.", "data.options")) and not describe.doc(path)]
    assert undocumented == [], "add them to tx.train.describe.DOCS"


def test_builtin_configs_are_the_config_files_and_every_package_is_installed():
    assert set(_cli.builtin_configs()) == {p.stem for p in (ROOT / "configs").glob("[!_]*.py")}
    ablation = _cli.builtin_configs()["ablation"]
    assert _cli.config_file("tx:ablation:uptrain") == f"{ablation}:uptrain"
    with pytest.raises(ValueError, match="built-in: tx:ablation, tx:decoder_lm"):
        _cli.config_file("tx:nope")
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(str(ROOT), include=["tx", "tx.*"])
    mapped = {"tx.configs": "configs", "tx.kernels": "kernels", "tx.experiments": "experiments"}
    assert sorted(settings["packages"]) == sorted(found + list(mapped))
    assert settings["package-dir"] == mapped  # one top-level package: tx


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """``pip install .`` adds ``tx`` and nothing else: kernels, experiments and configs live
    under it, the cpu kernel's C++ sources included."""
    import subprocess
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(ROOT), "-w", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("tx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"tx", wheel.name.split("-py")[0] + ".dist-info"}
    assert {"tx/kernels/cpu_attention.cc", "tx/experiments/train.py",
            "tx/configs/decoder_lm.py"} <= set(names)
