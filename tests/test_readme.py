"""The README's commands are the whole set-up; CI must run the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands():
    return re.findall(r"```\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands():
    commands = _commands()
    assert len(commands) == 2
    assert "experiments/" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_python_blocks_run(tmp_path):
    """Every ```python block of the README runs as shown (each in a fresh namespace, all in
    one process: they compile the same tiny models)."""
    import subprocess
    import sys
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    runner = ("import sys\nfor i, block in enumerate(sys.argv[1:]):\n"
              "    exec(compile(block, f'<README python block {i + 1}>', 'exec'), {})\n")
    done = subprocess.run([sys.executable, "-c", runner, *blocks], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
