"""``bilevel-report``: summarise training runs — one row per setting, the study's declared and
exploratory comparisons, figures, per-seed data and a self-contained ``report.html``. The command
line only: it composes :mod:`bilevel.app.report` (runs and tables), :mod:`bilevel.app.study`
and :mod:`bilevel.app.study_claims` (statistics), :mod:`bilevel.app.report_figures` and
:mod:`bilevel.app.study_figures` (figures), :mod:`bilevel.app.seed_data` and
:mod:`bilevel.app.report_html`, none of which imports another's command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from bilevel.app import seed_data
from bilevel.app.report import (
    SETTINGS_HEADING, NoRunsError, find_runs, group_runs, markdown_table, report_json, short_run_warning, summarise,
)
from bilevel.app.report_figures import FIGURES, write_figures
from bilevel.app.report_html import write_report_html
from bilevel.app.study import study_dict, study_markdown
from bilevel.app.study_claims import declarations
from bilevel.app.study_figures import STUDY_FIGURES


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
                        help="also write the per-seed data (bilevel.app.seed_data) as PATH; a RUN_DIR that is "
                        "such a file (*.seeds.json) is read in place of run directories")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``bilevel-report``; exits with code 2 when a path holds no run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dirs = [p for p in args.paths if not p.is_file()]
        runs = [r for p in args.paths if p.is_file() for r in seed_data.load_seed_data(p)]
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
        seed_data.write_seed_data(runs, args.seeds)
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


if __name__ == "__main__":
    main()
