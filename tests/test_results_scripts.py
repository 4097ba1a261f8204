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
    assert walltime.rows(tmp_path) == [("glyphs/head_policy", 2, 180.0, 90.0)]  # no synthetic tier here
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


def manifest() -> dict[str, str]:
    lines = (ROOT / "docs" / "results" / "reports.tsv").read_text().splitlines()
    return dict(line.split("\t") for line in lines if line and not line.startswith("#"))


def test_the_report_manifest_names_every_published_report_and_gives_each_sweep_one_report() -> None:
    import re

    reports = manifest()
    template = (ROOT / "docs" / "results" / "RESULTS.template.md").read_text()
    pasted = set(re.findall(r"\{\{(\w+)\.md#", template)) - {"walltime"}
    on_disk = {p.stem for p in (ROOT / "docs" / "results").glob("*_*.md")}
    assert pasted <= set(reports) and set(reports) == on_disk
    sweeps = [sweep for sweep in reports.values() if sweep != "-"]
    assert len(sweeps) == len(set(sweeps))
    for report, sweep in reports.items():
        assert report.split("_")[0] in ("glyphs", "synthetic")
        assert sweep == "-" or sweep.startswith("synthetic/") == report.startswith("synthetic_")


def test_report_all_writes_each_sweep_to_the_report_the_manifest_names(tmp_path: Path) -> None:
    """A rerun into a folder whose report has another name (``head_policy`` → ``*_head_policy_paper``)
    is reported under the manifest's name; an unlisted sweep is named, not skipped in silence."""
    import subprocess

    for sweep in ("head_policy", "synthetic/head_policy", "synthetic/shots", "new_study", "cosine_similarity"):
        (tmp_path / sweep / ("seed=0" if sweep != "cosine_similarity" else "multirun.yaml")).mkdir(parents=True)
    out = subprocess.run(["bash", str(ROOT / "docs" / "results" / "report_all.sh"), "-n", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    commands = [line.split() for line in out.splitlines() if line.startswith("python")]
    written = {cmd[3]: cmd[cmd.index("--markdown") + 1] for cmd in commands}
    assert written == {f"{tmp_path}/head_policy": "docs/results/glyphs_head_policy_paper.md",
                       f"{tmp_path}/synthetic/head_policy": "docs/results/synthetic_head_policy_paper.md",
                       f"{tmp_path}/synthetic/shots": "docs/results/synthetic_shots.md"}
    assert "new_study: has runs but no report" in out
    assert "glyphs_cosine_similarity: kept as published" in out
