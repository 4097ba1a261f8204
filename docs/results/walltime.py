"""Wall time per study from its runs' ``metrics.json`` (``wall_seconds``: one thread each, on the
shared 2-core machine; a resumed run counts its last attempt only), as a Markdown table:

    python docs/results/walltime.py studies_runs [MORE_ROOTS ...] [--keep docs/results/walltime.md] > walltime.new.md

Several roots (e.g. the clean clones different sweeps ran in) make one table.

``--keep FILE``: the rows of an earlier table whose sweep is no longer under the root are kept
(marked so): a sweep's run folders can be cleared once its report is written.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path) -> list[tuple[str, int, float, float]]:
    """``(tier/study, finished runs, total wall s, wall s per run)`` for every sweep under ``root``."""
    out = []
    for tier, base in (("glyphs", root), ("synthetic", root / "synthetic")):
        if not base.is_dir():
            continue
        for study in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "synthetic"):
            walls = [json.loads(m.read_text()).get("wall_seconds", 0.0) for m in study.glob("*/metrics.json")]
            if walls:
                out.append((f"{tier}/{study.name}", len(walls), sum(walls), sum(walls) / len(walls)))
    return out


def kept_rows(table: str, present: set[str]) -> list[str]:
    """The data rows of an earlier table whose sweep is not in ``present`` (kept or not before), marked as kept."""
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "sweep" and cells[0].removesuffix(" *") not in present:
            name = cells[0] if cells[0].endswith("*") else cells[0] + " *"
            out.append("| " + " | ".join([name] + cells[1:]) + " |")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    keep = None
    if "--keep" in args:
        i = args.index("--keep")
        keep = Path(args[i + 1])
        del args[i:i + 2]
    found = [row for root in (args or ["studies_runs"]) for row in rows(Path(root))]
    lines = [f"| {name} | {n} | {total / 60:.1f} min | {per:.0f} s |" for name, n, total, per in found]
    if keep is not None and keep.exists():
        lines += kept_rows(keep.read_text(), {name for name, *_ in found})
    print("| sweep | finished runs | wall time, all runs | per run |\n|---|---|---|---|")
    print("\n".join(sorted(lines)))
    if keep is not None:
        print("\n\\* from an earlier sitting's table: the sweep's run folders are no longer on this machine.")
