"""Every dotted reference to the package in docstrings and docs (``bilevel.x.y.Name`` in a Sphinx
role such as :func:`~bilevel.x.f` or in backticks) names something that exists: a moved or renamed
object leaves no stale pointer behind."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"[`~]((?:bilevel|algorithms)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
NOT_OBJECTS = {
    "bilevel.algorithms",  # the entry-point group's name, not a module
    "bilevel.train",  # RESULTS.md quotes the trainer module of its earliest recorded commands
}
SOURCES = sorted([*ROOT.glob("bilevel/**/*.py"), *ROOT.glob("algorithms/*.py"), *ROOT.glob("docs/*.md"),
                  ROOT / "README.md"])


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute chain of the longest importable prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def references() -> list[tuple[str, str]]:
    found = []
    for path in SOURCES:
        for dotted in sorted(set(REFERENCE.findall(path.read_text()))):
            if dotted not in NOT_OBJECTS:
                found.append((str(path.relative_to(ROOT)), dotted.rstrip(".")))
    return found


def test_the_scan_finds_references():
    assert len(references()) > 50


def test_every_reference_resolves():
    stale = [f"{path}: {dotted}" for path, dotted in references() if not resolves(dotted)]
    assert not stale, "stale references:\n" + "\n".join(stale)


@pytest.mark.parametrize("dotted, ok", [("bilevel.decomposition.step.Want", True),
                                        ("bilevel.decomposition.cotangents.Decomposition", False)])
def test_the_resolver_tells_them_apart(dotted, ok):
    assert resolves(dotted) is ok
