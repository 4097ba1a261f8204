"""Built-in algorithms register through the ``bilevel.algorithms`` entry-point group, as external
plugins do: the engine imports no plugin."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from bilevel import available_algorithms, get_algorithm

ROOT = Path(__file__).resolve().parents[1]


def test_every_builtin_is_an_entry_point_of_the_package():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["bilevel.algorithms"]
    modules = {p.stem for p in (ROOT / "algorithms").glob("*.py") if p.stem != "__init__"}
    assert {target.split(":")[0].split(".")[1] for target in declared.values()} == modules
    assert set(declared) <= set(available_algorithms())
    for name, target in declared.items():
        module, cls = target.split(":")
        assert get_algorithm(name).__module__ == module and get_algorithm(name).__name__ == cls


def test_the_engine_imports_no_plugin():
    code = ("import sys, bilevel, bilevel.app.train, bilevel.report; "
            "assert not [m for m in sys.modules if m == 'algorithms' or m.startswith('algorithms.')], sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "bilevel").rglob("*.py")
                 if "import algorithms" in p.read_text() or "from algorithms" in p.read_text()]
    assert offenders == []
