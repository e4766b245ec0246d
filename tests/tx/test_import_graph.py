"""The modules of ``tx`` import each other without a cycle: the graph of imports between ``tx``
modules (``kernels`` and third-party packages are outside it) is acyclic, both for the imports
that run when a module is imported (module level, under ``if``/``try``/``with`` too) and with
the imports deferred into functions counted as well (a deferred import only hides a cycle,
as ``train/loop.py`` <-> ``train/init.py`` once did).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _modules() -> dict[str, pathlib.Path]:
    """``{dotted name: file}`` of every module and package under tx/."""
    out = {}
    for path in sorted((ROOT / "tx").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level(body):
    """The statements that run at import: the module body, descending into ``if``, ``try``
    and ``with`` blocks but not into functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                yield from _top_level(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level(handler.body)


def _imports(name: str, path: pathlib.Path, modules: dict, *, deferred: bool = False
             ) -> set[str]:
    """The tx modules ``name`` imports when it is imported (``deferred``: or later, from its
    functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in (ast.walk(tree) if deferred else _top_level(tree.body)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from a import b``: the module a.b when there is one, else an attribute of a.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("deferred", [False, True], ids=["module_level", "with_deferred"])
def test_the_import_graph_of_tx_has_no_cycle(deferred):
    modules = _modules()
    graph = {name: _imports(name, path, modules, deferred=deferred)
             for name, path in modules.items()}
    assert "tx.train.workdir" in graph["tx.train.loop"]  # the walk sees real imports
    assert ("tx.research.plots" in graph["tx.train.loop"]) == deferred  # loss.png, deferred
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_loop_and_pretrained_starts_share_the_workdir_module():
    modules = _modules()
    loop = _imports("tx.train.loop", modules["tx.train.loop"], modules)
    pretrained = _imports("tx.train.pretrained", modules["tx.train.pretrained"], modules)
    workdir = _imports("tx.train.workdir", modules["tx.train.workdir"], modules)
    assert "tx.train.workdir" in loop and "tx.train.workdir" in pretrained
    assert "tx.train.pretrained" in loop and "tx.train.loop" not in pretrained
    assert not {"tx.train.loop", "tx.train.pretrained"} & workdir
