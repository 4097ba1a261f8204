"""``bilevel-report`` (``python -m bilevel.report``): summarise training runs — one row per setting,
the study's declared and exploratory comparisons, figures, per-seed data and a self-contained
``report.html``. The command line only: it composes :mod:`bilevel.report.runs` and
:mod:`bilevel.report.tables` (runs and the table), :mod:`bilevel.report.study` and
:mod:`bilevel.report.study_claims` (statistics), :mod:`bilevel.report.figures` and
:mod:`bilevel.report.study_figures` (figures), :mod:`bilevel.report.seed_data` and
:mod:`bilevel.report.html`, none of which imports another's command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from bilevel.report.figures import FIGURES, write_figures
from bilevel.report.html import write_report_html
from bilevel.report.runs import NoRunsError, find_runs, group_runs, short_run_warning
from bilevel.report.seed_data import load_seed_data, write_seed_data
from bilevel.report.study import study_dict, study_markdown
from bilevel.report.study_claims import declarations
from bilevel.report.study_figures import STUDY_FIGURES
from bilevel.report.tables import SETTINGS_HEADING, markdown_table, report_json, summarise


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bilevel-report``."""
    parser = argparse.ArgumentParser(
        prog="bilevel-report",
        description="Summarise training runs: one row per setting (runs that differ only in seed), "
        "with accuracy, test-time-zeroing and feature-cosine statistics, and PNG figures.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories or sweep directories (searched at any depth)")
    parser.add_argument("--out", type=Path, help="figure directory (default: report/ under the first RUN_DIR)")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help="also write the tables as Markdown (with the study's arms table, which "
                             "docs/results quotes)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summaries as JSON")
    parser.add_argument("--seeds", type=Path, metavar="PATH",
                        help="also write the per-seed data (bilevel.report.seed_data) as PATH; a RUN_DIR that is "
                        "such a file (*.seeds.json) is read in place of run directories")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``bilevel-report``; exits with code 2 when a path holds no run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dirs = [p for p in args.paths if not p.is_file()]
        runs = [r for p in args.paths if p.is_file() for r in load_seed_data(p)]
        runs += find_runs(dirs) if dirs else []
    except (NoRunsError, ValueError) as error:
        parser.error(str(error))
    warning = short_run_warning(runs)
    if warning is not None:
        print(warning, file=sys.stderr)
    groups = group_runs(runs)
    summaries = [summarise(g) for g in groups]
    try:
        declarations(groups)
    except ValueError as error:
        parser.error(f"{error} (fix study.comparisons in the study config, configs/experiment/)")
    table = markdown_table(summaries)
    statistics = study_markdown(groups, arms=False)  # the table above shows the arms
    sys.stdout.write(table + "\n" + statistics)
    if args.markdown is not None:  # for docs/results: the study's arms table too, which RESULTS.md quotes
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n" + study_markdown(groups))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(report_json(summaries))
    if args.seeds is not None:
        write_seed_data(runs, args.seeds)
    first = args.paths[0].parent if args.paths[0].is_file() else args.paths[0]
    out = args.out if args.out is not None else first / "report"
    figures = write_figures(groups, out, STUDY_FIGURES[:1] + FIGURES + STUDY_FIGURES[1:])
    for path in figures:
        print(f"wrote {path}")
    (out / "study.json").write_text(json.dumps(study_dict(groups), indent=1))
    print(f"wrote {out / 'study.json'}")
    page = write_report_html(out, args.paths, f"### {SETTINGS_HEADING}\n\n{table}\n{statistics}", figures,
                             [warning] if warning else [])
    print(f"wrote {page} (self-contained: open it in a browser)")

