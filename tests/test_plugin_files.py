"""The plugin files themselves: what they import, and the line counts ``docs/plugins.md`` gives.

A plugin file is the module an entry point of the ``bilevel.algorithms`` group names, in the
repository's ``pyproject.toml`` or in an example package's (``examples/pyproject.toml``,
``examples/reptile_plugin/pyproject.toml``). Each imports only the standard library, ``torch``
and the package ``bilevel`` itself — never a module inside it — and only names that ``bilevel``
exports (``bilevel.__all__``), so the engine's modules can move without breaking a plugin.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

import bilevel

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = [ROOT / "pyproject.toml", ROOT / "examples" / "pyproject.toml",
            ROOT / "examples" / "reptile_plugin" / "pyproject.toml"]
ALLOWED_TOP = set(sys.stdlib_module_names) | {"torch", "__future__"}
DOC = ROOT / "docs" / "plugins.md"


def plugin_files() -> list[Path]:
    """The file of every module named by a ``bilevel.algorithms`` entry point."""
    files = set()
    for project in PROJECTS:
        declared = tomllib.loads(project.read_text())["project"]["entry-points"]["bilevel.algorithms"]
        for target in declared.values():
            parts = target.split(":")[0].split(".")
            base = project.parent / Path(*parts)
            files.add(base / "__init__.py" if base.is_dir() else base.with_suffix(".py"))
    return sorted(files)


def test_every_algorithm_module_is_a_registered_plugin():
    modules = {p for p in (ROOT / "algorithms").glob("*.py") if p.name != "__init__.py"}
    assert modules <= set(plugin_files())
    assert all(p.exists() for p in plugin_files())
    assert {p.name for p in plugin_files() if p.parent.name == "examples"} == {"boil.py", "protomaml.py"}


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_only_from_bilevel(path):
    exported = set(bilevel.__all__)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in ALLOWED_TOP, f"{path.name}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "bilevel":
                hidden = [a.name for a in node.names if a.name not in exported]
                assert not hidden, f"{path.name} imports {hidden}, which bilevel does not export"
            else:
                assert node.level == 0 and module.split(".")[0] in ALLOWED_TOP, \
                    f"{path.name}: from {'.' * node.level}{module} import ... (plugins import from bilevel only)"


def documented_line_counts() -> dict[str, int]:
    """``| `path` | lines | ... |`` rows of the size table in docs/plugins.md."""
    return {path: int(n) for path, n in re.findall(r"^\| `([^`]+\.py)` \| (\d+) \|", DOC.read_text(), re.M)}


def test_docs_line_counts_are_the_files():
    actual = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in plugin_files()}
    actual["algorithms/__init__.py"] = len((ROOT / "algorithms" / "__init__.py").read_text().splitlines())
    table = "\n".join(f"| `{path}` | {n} |" for path, n in sorted(actual.items()))
    assert documented_line_counts() == actual, f"docs/plugins.md's size table should read:\n{table}"


def test_docs_give_line_counts_only_in_the_table():
    """A count in prose would go stale unseen: the walk-throughs refer to the table."""
    prose = [line for line in DOC.read_text().splitlines() if not line.startswith("|")]
    assert not [line for line in prose if re.search(r"\b\d+ lines\b", line)]


@pytest.mark.parametrize("path, marker", [("examples/boil.py", "class BOIL("),
                                          ("examples/protomaml.py", "class ProtoMAML(")])
def test_docs_walk_through_code_is_the_files(path, marker):
    """Every line of the walk-through's code block is a line of the example file (the block leaves
    out docstrings, never changes code)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if marker in b]
    assert len(blocks) == 1
    source = {line.strip() for line in (ROOT / path).read_text().splitlines()}
    missing = [line for line in blocks[0].splitlines() if line.strip() and line.strip() not in source]
    assert not missing, f"docs/plugins.md shows lines that {path} does not have: {missing}"
