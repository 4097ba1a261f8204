"""Wall time per study from its runs' ``metrics.json`` (``wall_seconds``: one thread each, on the
shared 2-core machine; a resumed run counts its last attempt only), as a Markdown table:

    python docs/results/walltime.py studies_runs > docs/results/walltime.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path) -> list[tuple[str, int, float, float]]:
    """``(tier/study, finished runs, total wall s, wall s per run)`` for every sweep under ``root``."""
    out = []
    for tier, base in (("glyphs", root), ("synthetic", root / "synthetic")):
        for study in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "synthetic"):
            walls = [json.loads(m.read_text()).get("wall_seconds", 0.0) for m in study.glob("*/metrics.json")]
            if walls:
                out.append((f"{tier}/{study.name}", len(walls), sum(walls), sum(walls) / len(walls)))
    return out


if __name__ == "__main__":
    print("| sweep | finished runs | wall time, all runs | per run |\n|---|---|---|---|")
    for name, n, total, per in rows(Path(sys.argv[1] if len(sys.argv) > 1 else "studies_runs")):
        print(f"| {name} | {n} | {total / 60:.1f} min | {per:.0f} s |")
