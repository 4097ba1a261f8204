"""The layer contract of pyproject.toml ([tool.importlinter]) holds: no module imports a higher
layer, no import cycles between sibling packages, and ``import bilevel`` does not load Hydra."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_holds():
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                             "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_import_bilevel_does_not_load_hydra():
    code = ("import sys, bilevel; bilevel.ci95; "
            "print(sorted(m for m in sys.modules if m == 'hydra' or m.startswith('hydra.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
