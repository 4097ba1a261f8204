"""Build docs/RESULTS.md from RESULTS.template.md and the tables bilevel-report wrote.

A line ``{{FILE#HEADING}}`` in the template is replaced by the section of ``FILE`` (relative to
this folder; written by ``bilevel-report ... --markdown FILE``) whose ``### `` heading starts with
``HEADING``, up to the next ``### `` heading; ``{{FILE}}`` includes the whole file. So every table
in RESULTS.md is bilevel-report's output, unedited:

    python docs/results/build_results.py

Above each pasted table goes its provenance (:func:`provenance_line`), from the sweep's per-seed
file ``FILE`` → ``<stem>.seeds.json`` (``bilevel-report --seeds``): the commit and engine epoch its
runs record, or a mark — *predates provenance* (no per-seed file: the table cannot be recomputed
from the repository, and its runs recorded no code) or *predates engine epoch N* (some run
recorded an older epoch, or none: the engine's float64 meta-gradients changed since).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's engine, not an installed one

from bilevel.app.lifecycle.provenance import ENGINE_EPOCH  # noqa: E402

DIRECTIVE = re.compile(r"^\{\{([^#}]+)(?:#([^}]+))?\}\}$")
PREDATES_PROVENANCE = ("> ⚠ **predates provenance**: no per-seed data in the repository; this table cannot be "
                       "recomputed from it, and its runs recorded no commit or engine epoch.")


def section(text: str, heading: str) -> str:
    """The ``### heading…`` section of ``text`` (without its heading line)."""
    parts = re.split(r"^### ", text, flags=re.M)
    for part in parts[1:]:
        if part.startswith(heading):
            return part.split("\n", 1)[1].strip("\n") + "\n"
    raise KeyError(f"no section starting with {heading!r}")


def seeds_file(report: Path) -> Path:
    """The per-seed file of a report ``X.md``: ``X.seeds.json``."""
    return report.with_name(report.stem + ".seeds.json")


def provenance_line(report: Path) -> Optional[str]:
    """The line above a pasted table of ``report`` (module docstring); None for a file that is not
    a sweep's report (no ``### `` sections)."""
    seeds = seeds_file(report)
    if not seeds.is_file():
        return PREDATES_PROVENANCE
    records = [run.get("provenance") for run in json.loads(seeds.read_text())["runs"]]
    epochs = {None if r is None else r.get("engine_epoch") for r in records}
    if None in epochs or min(epochs) < ENGINE_EPOCH:
        return (f"> ⚠ **predates engine epoch {ENGINE_EPOCH}**: some of its runs recorded an older engine epoch "
                f"(or none): the engine's float64 meta-gradients changed since they ran.")
    commits = sorted({r["commit"][:7] + (" (dirty tree)" if r["dirty"] else "") for r in records})
    return (f"> Recomputable: per-seed data in `results/{seeds.name}` ({len(records)} runs; commit "
            f"{', '.join(commits)}; engine epoch {ENGINE_EPOCH}).")


def build(template: str) -> str:
    out = []
    for line in template.splitlines():
        match = DIRECTIVE.match(line.strip())
        if match is None:
            out.append(line)
            continue
        path, heading = HERE / match.group(1).strip(), match.group(2)
        if not path.is_file():
            out.append(f"*(not run: {match.group(1).strip()} does not exist)*")
            continue
        text = path.read_text()
        if "\n### " in "\n" + text:
            out.append(provenance_line(path) + "\n")
        out.append((section(text, heading.strip()) if heading else text).rstrip("\n"))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = HERE.parent / "RESULTS.md"
    target.write_text(build((HERE / "RESULTS.template.md").read_text()))
    print(f"wrote {target}", file=sys.stderr)
