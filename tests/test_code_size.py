"""The house rules a maintainer can rely on: no module of ``bilevel/`` over 400 lines, and no
function outside the tests (package, plugins, examples, benchmarks, checks, doc scripts) over
50 lines or 8 parameters (``self`` and ``cls`` not counted). A file that grows past them is split by job, a long parameter list becomes
a small frozen dataclass (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 400, 50, 8


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args]
    count = len(names) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (names[:1] in (["self"], ["cls"]))


def oversized_functions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES or parameters(node) > MAX_PARAMETERS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines, "
                             f"{parameters(node)} parameters)")
    return found


def test_no_module_of_the_package_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in python_files("bilevel")
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these modules by job (over {MAX_FILE_LINES} lines): {long}"


@pytest.mark.parametrize("folder", ["bilevel", "algorithms", "examples", "benchmarks", "theory_checks", "docs"])
def test_no_function_is_over_50_lines_or_8_parameters(folder: str) -> None:
    found = [f for p in python_files(folder) for f in oversized_functions(p)]
    assert not found, "\n".join(found)


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    sample = tmp_path / "sample.py"
    sample.write_text(f"def wide(self, {', '.join(f'a{i}' for i in range(9))}):\n    pass\n\n"
                      f"def tall():\n{body}\n\nclass C:\n    def ok(self, {', '.join(f'a{i}' for i in range(8))}):\n        pass\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [f.split()[1] for f in oversized_functions(sample)] == ["wide", "tall"]
    finally:
        ROOT = saved
