"""Run every registered theory check and print a table; exit 1 if any claim fails.

Usage: ``python -m theory_checks [--only SUBSTRING] [--json PATH|-]`` (console script
``bilevel-check``). Every module of the package is imported (``pkgutil`` over
``theory_checks.__path__``), so a new claim module is picked up without editing this file.
A check that raises, or a module that fails to import, becomes a FAIL row carrying the error;
the other checks still run. Exit status: 0 all claims pass, 1 some claim fails, 2 nothing
matched ``--only``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import sys
import time
from typing import Callable, Optional, TextIO

import theory_checks

from .core import CHECKS, ClaimResult

Row = tuple[str, ClaimResult]


def _error_row(source: str, err: BaseException) -> Row:
    return source, ClaimResult("error", f"{type(err).__name__}: {err}", math.nan, math.nan)


def _selected(name: str, only: Optional[str]) -> bool:
    return not only or only in name


def load_modules(only: Optional[str] = None) -> list[Row]:
    """Import every non-private module of the package. A module that fails to import becomes
    a FAIL row named ``theory_checks.<module>.<import>`` (kept when ``only`` matches it)."""
    failures = []
    for info in pkgutil.iter_modules(theory_checks.__path__):
        if info.name.startswith("_"):
            continue
        module = f"{theory_checks.__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001  (reported as a failed claim)
            if _selected(f"{module}.<import>", only):
                failures.append(_error_row(f"{module}.<import>", err))
    return failures


def check_name(fn: Callable) -> str:
    """``theory_checks.<module>.<function>``: what ``--only`` matches."""
    return f"{fn.__module__}.{fn.__name__}"


def run_checks(only: Optional[str] = None) -> list[Row]:
    """Run the registered checks whose name contains ``only``; ``(check name, result)`` rows."""
    rows: list[Row] = []
    for fn in CHECKS:
        name = check_name(fn)
        if not _selected(name, only):
            continue
        try:
            rows += [(name, result) for result in fn()]
        except Exception as err:  # noqa: BLE001  (reported as a failed claim)
            rows.append(_error_row(name, err))
    return rows


def print_table(rows: list[Row], out: TextIO) -> None:
    """One line per claim: id, check, PASS/FAIL, measured value, comparison, threshold, description."""
    prefix = f"{theory_checks.__name__}."
    rows = [(name.removeprefix(prefix), r) for name, r in rows]
    width = max(len(name) for name, _ in rows)
    header = f"{'claim':<6} {'check':<{width}} {'result':<6} {'value':>11}    {'threshold':>10}  description"
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, r in rows:
        status = "PASS" if r.passed else "FAIL"
        print(f"{r.claim:<6} {name:<{width}} {status:<6} {r.value:>11.3e} {r.compare:>2} "
              f"{r.threshold:>10.3e}  {r.description}", file=out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bilevel-check", description="Verify the claims of docs/theory.md §7 numerically (float64, CPU).",
        epilog="exit status: 0 every claim passes; 1 a claim fails or a check raises (a FAIL row "
               "carrying the error); 2 no check matches --only",
    )
    parser.add_argument("--only", metavar="SUBSTRING",
                        help="run only the checks whose name 'theory_checks.<module>.<function>' "
                             "contains SUBSTRING (e.g. 'theory_checks.maml_claims.', 'identity')")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the rows as a JSON list to PATH ('-' = stdout; the table "
                             "then goes to stderr); each row: claim, check, description, value, "
                             "threshold, compare, passed (NaN values are written as null)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = load_modules(args.only) + run_checks(args.only)
    elapsed = time.perf_counter() - start
    table_out = sys.stderr if args.json == "-" else sys.stdout
    if not rows:
        print(f"no check matches --only {args.only!r}", file=sys.stderr)
        return 2
    print_table(rows, table_out)
    failed = sum(not r.passed for _, r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} claims pass ({elapsed:.1f} s)", file=table_out)
    if args.json:
        payload = [
            {**r.as_dict(), "check": name,
             "value": None if math.isnan(r.value) else r.value,
             "threshold": None if math.isnan(r.threshold) else r.threshold}
            for name, r in rows
        ]
        if args.json == "-":
            json.dump(payload, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
