"""A sweep's per-seed data: what a study's tables are computed from, small enough to commit.

``bilevel-report SWEEP --seeds PATH`` writes one JSON file: ``shared`` (the flattened config keys
every run has alike, the study's declared comparisons among them), and per run ``config`` (the
keys where runs differ, the seed included), ``metrics`` (its ``metrics.json``), ``curves`` (the
validation accuracy and the feature cosines of :data:`CURVES`, each ``[steps, values]``) and
``provenance`` (the code it ran:
:mod:`bilevel.app.lifecycle.provenance`; null for a run that predates the record). ``bilevel-report PATH``
reads such a file as it reads run directories, so the arms table, the declared and exploratory
comparisons and test-time zeroing are recomputed from the repository alone (the decomposition
and cosine sections need the TensorBoard events and are not).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bilevel.report.runs import COS_DIFF, COS_SAME, EVAL_ACCURACY, RunRecord
from bilevel.run_files import PROVENANCE, flatten

SUFFIX = ".seeds.json"
FORMAT = 1
CURVES = (EVAL_ACCURACY, COS_SAME, COS_DIFF)


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def seed_data(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """The per-seed record of ``runs`` (module docstring)."""
    flat = [{k: _jsonable(v) for k, v in flatten(r.config).items() if not k.startswith(PROVENANCE + ".")}
            for r in runs]
    keys = sorted({k for f in flat for k in f})
    shared = {k: flat[0][k] for k in keys if all(k in f and f[k] == flat[0][k] for f in flat)}
    return {
        "format": FORMAT,
        "shared": shared,
        "runs": [{
            "config": {k: v for k, v in f.items() if k not in shared},
            "metrics": r.metrics,
            "curves": {tag: [r.scalars[tag][0].tolist(), r.scalars[tag][1].tolist()] for tag in CURVES
                       if tag in r.scalars},
            "provenance": r.config.get(PROVENANCE),
        } for f, r in zip(flat, runs)],
    }


def write_seed_data(runs: Sequence[RunRecord], path: Path) -> None:
    """Write :func:`seed_data` as compact JSON (one run per line)."""
    data = seed_data(runs)
    lines = [json.dumps(run) for run in data["runs"]]
    head = json.dumps({"format": data["format"], "shared": data["shared"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head[:-1] + ',\n"runs": [\n' + ",\n".join(lines) + "\n]}\n")


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys back to a config tree (the inverse of :func:`bilevel.run_files.flatten`)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_seed_data(path: Path) -> list[RunRecord]:
    """The runs of a per-seed file as :class:`~bilevel.report.runs.RunRecord` (scalars: the curves)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a per-seed file of format {FORMAT} (written by bilevel-report --seeds)")
    out = []
    for i, run in enumerate(data["runs"]):
        config = unflatten({**data["shared"], **run["config"]})
        if run.get("provenance") is not None:
            config[PROVENANCE] = run["provenance"]
        scalars = {tag: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
                   for tag, (s, v) in run["curves"].items()}
        out.append(RunRecord(Path(path) / str(i), config, scalars, {k: float(v) for k, v in run["metrics"].items()}))
    return out
