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


REFERENCE_SHA256 = {1: "8114137cc164064afe1f85e0eb2dda5d24d5ecda7ae2bf06fe83f380d2268fbe"}
"""The float64 reference meta-gradients of each engine epoch: regenerating the file means the
engine's meta-gradients changed, so ENGINE_EPOCH must be bumped and the new hash added here."""


def test_the_engine_epoch_names_the_saved_reference_meta_gradients() -> None:
    import hashlib

    from bilevel.app.lifecycle.provenance import ENGINE_EPOCH

    digest = hashlib.sha256((ROOT / "tests" / "data" / "reference_meta_grads.pt").read_bytes()).hexdigest()
    assert REFERENCE_SHA256.get(ENGINE_EPOCH) == digest, (
        "tests/data/reference_meta_grads.pt changed: bump ENGINE_EPOCH (bilevel/app/lifecycle/provenance.py) and add its "
        "hash to REFERENCE_SHA256")


def test_a_published_table_is_recomputed_from_the_committed_per_seed_data() -> None:
    """§7.2 of RESULTS.md (the shots sweep): its arms, declared, effect-size, exploratory and
    test-time sections, recomputed from ``synthetic_shots.seeds.json`` alone, equal the published
    report's, and every run records a clean tree of one commit at the current engine epoch."""
    from bilevel.app.lifecycle.provenance import ENGINE_EPOCH
    from bilevel.report.runs import group_runs
    from bilevel.report.seed_data import load_seed_data
    from bilevel.report.study import study_markdown

    build_results = load("build_results")
    runs = load_seed_data(ROOT / "docs" / "results" / "synthetic_shots.seeds.json")
    assert len(runs) == 72
    assert {(r.config["provenance"]["dirty"], r.config["provenance"]["engine_epoch"]) for r in runs} == {
        (False, ENGINE_EPOCH)}
    assert len({r.config["provenance"]["commit"] for r in runs}) == 1
    recomputed = study_markdown(group_runs(runs))
    published = (ROOT / "docs" / "results" / "synthetic_shots.md").read_text()
    for heading in ("Arms", "Declared", "Effect sizes", "Exploratory", "Test-time"):
        assert build_results.section(recomputed, heading) == build_results.section(published, heading)
    assert "**not reproduced**" in build_results.section(recomputed, "Declared")


def test_results_md_is_the_template_built_and_marks_tables_without_per_seed_data(tmp_path: Path) -> None:
    build_results = load("build_results")
    template = (ROOT / "docs" / "results" / "RESULTS.template.md").read_text()
    assert build_results.build(template) == (ROOT / "docs" / "RESULTS.md").read_text()
    report = tmp_path / "x.md"
    report.write_text("### Arms\n\n| a |\n")
    assert build_results.provenance_line(report) == build_results.PREDATES_PROVENANCE
    run = {"config": {}, "metrics": {}, "curves": {}}
    record = {"commit": "0123456789", "dirty": False, "engine_sha256": "x", "engine_epoch": 0}
    seeds = tmp_path / "x.seeds.json"
    seeds.write_text(json.dumps({"format": 1, "shared": {}, "runs": [{**run, "provenance": record}]}))
    assert "predates engine epoch" in build_results.provenance_line(report)
    seeds.write_text(json.dumps({"format": 1, "shared": {}, "runs": [{**run, "provenance": None}]}))
    assert "predates engine epoch" in build_results.provenance_line(report)
    current = {**record, "engine_epoch": build_results.ENGINE_EPOCH}
    seeds.write_text(json.dumps({"format": 1, "shared": {}, "runs": [{**run, "provenance": current}]}))
    assert build_results.provenance_line(report).startswith("> Recomputable") and "0123456" in \
        build_results.provenance_line(report)
