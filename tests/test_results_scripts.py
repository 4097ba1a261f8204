"""The scripts that rebuild docs/RESULTS.md: the wall-time table keeps the rows of sweeps whose run
folders are gone, and the template's directives paste the report's sections."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "results" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_walltime_counts_runs_and_keeps_cleared_sweeps(tmp_path: Path) -> None:
    walltime = load("walltime")
    for seed, wall in ((0, 60.0), (1, 120.0)):
        run = tmp_path / "head_policy" / f"seed={seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"wall_seconds": wall}))
    (tmp_path / "synthetic").mkdir()
    found = walltime.rows(tmp_path)
    assert found == [("glyphs/head_policy", 2, 180.0, 90.0)]
    earlier = ("| sweep | finished runs | wall time, all runs | per run |\n|---|---|---|---|\n"
               "| glyphs/head_policy | 1 | 1.0 min | 60 s |\n| glyphs/cosine_similarity | 30 | 30.3 min | 61 s |\n")
    kept = walltime.kept_rows(earlier, {name for name, *_ in found})
    assert kept == ["| glyphs/cosine_similarity * | 30 | 30.3 min | 61 s |"]
    assert walltime.kept_rows("\n".join(kept), set()) == kept  # kept twice: marked once
    assert walltime.kept_rows("\n".join(kept), {"glyphs/cosine_similarity"}) == []  # rerun: the new row replaces it


def test_build_pastes_a_report_section(tmp_path: Path) -> None:
    build_results = load("build_results")
    report = "### Arms (mean ± sd)\n\n| a |\n\n### Paired comparisons\n\n| p |\n"
    assert build_results.section(report, "Paired").strip() == "| p |"
    assert build_results.section(report, "Arms").strip() == "| a |"
