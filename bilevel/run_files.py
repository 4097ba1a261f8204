"""The files of a run directory, named once: the trainer (:mod:`bilevel.app`) writes them and the
report (:mod:`bilevel.report`) reads them back, so both spell them from here.

A run directory holds :data:`CONFIG` (the resolved config, the code it ran under
:data:`PROVENANCE`), :data:`METRICS` (written last, by a run that finished), the TensorBoard
events under :data:`EVENTS_DIR` (:func:`event_files`) and, with the cosine probe on,
:data:`PROBE_FILE` (:func:`load_probe`). A config is compared key by key in its flattened form
(:func:`flatten`): the resume fingerprint, the report's settings and the HPARAMS entry all read it so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

CONFIG = "config.yaml"
METRICS = "metrics.json"
EVENTS_DIR = "tb"
EVENT_FILES = "events.out.tfevents.*"
PROBE_FILE = "cosine_probe.json"
PROVENANCE = "provenance"
"""The section of :data:`CONFIG` that records the code a run ran (:mod:`bilevel.app.lifecycle.provenance`)."""


def event_files(run_dir: str | Path) -> list[Path]:
    """Every event file of a run directory, at any depth under ``tb/``."""
    return sorted((Path(run_dir) / EVENTS_DIR).rglob(EVENT_FILES))


def load_probe(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run's ``cosine_probe.json`` (``{"protocol": ..., "steps": {step: {name: matrix}}}``), or None."""
    path = Path(run_dir) / PROBE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys → leaf values of a config tree (lists become tuples, so values compare and hash)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out
