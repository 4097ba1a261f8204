"""The runs a report reads, and how it groups them into settings.

A *run directory* (written by :func:`bilevel.app.train.train`) holds ``config.yaml`` and the
TensorBoard events ``tb/`` (:mod:`bilevel.run_files`); ``metrics.json`` is optional. Every given
path is either a run directory or a directory searched at any depth for them (a Hydra multirun
sweep): :func:`find_runs`.

Runs whose flattened configs are equal except :data:`RUN_KEYS` (the seed and run-specific
keys: the resume mode, the execution path) form a *setting* (:func:`group_runs`). A setting is
labelled by the keys that differ between settings, ``key=value`` in key order; a key ``P.k`` is
left out of labels when ``P.name`` also differs and determines it (a Hydra group option is named
by ``name``: ``ablation.name=no_init`` stands for its ``keep``/``drop``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from tensorboard.backend.event_processing import event_accumulator

from bilevel import tags
from bilevel.run_files import CONFIG, EVENTS_DIR, METRICS, PROVENANCE, event_files, flatten

RUN_KEYS = ("seed", "train.resume", "execution")
RECORD_PREFIXES = ("study.", f"{PROVENANCE}.")
"""Config sections that describe a run without defining its setting: the study's declared
comparisons and the code it ran (:mod:`bilevel.app.lifecycle.provenance`)."""
RUN_DIR_CONTENTS = f"a run directory must contain {CONFIG} and a {EVENTS_DIR}/ folder of TensorBoard events"

EVAL_ACCURACY = tags.accuracy(tags.EVAL)
COS_SAME, COS_DIFF = tags.COS_SAME_CLASS, tags.COS_DIFF_CLASS
SHARE_PREFIX, SHARE_SUFFIX = tags.TERMS_PREFIX, f"/{tags.SHARE}"

Curve = tuple[np.ndarray, np.ndarray]


class NoRunsError(ValueError):
    """A path holds no run directory."""


@dataclass
class RunRecord:
    """One training run: its config (nested dict), scalars ``{tag: (steps, values)}`` sorted
    by step (one value per step: the last one written, so a resumed run overrides), and the
    final metrics (empty when ``metrics.json`` is missing)."""

    path: Path
    config: dict[str, Any]
    scalars: dict[str, Curve]
    metrics: dict[str, float]

    def final(self, tag: str) -> Optional[float]:
        """The value at the last logged step of ``tag`` (None when not logged)."""
        return float(self.scalars[tag][1][-1]) if tag in self.scalars else None

    def best(self, tag: str) -> Optional[float]:
        """The maximum over steps of ``tag`` (None when not logged)."""
        return float(self.scalars[tag][1].max()) if tag in self.scalars else None

    @property
    def last_step(self) -> int:
        """The last step at which anything was logged."""
        return max((int(steps[-1]) for steps, _ in self.scalars.values()), default=0)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds ``config.yaml`` and ``tb/``."""
    return (path / CONFIG).is_file() and (path / EVENTS_DIR).is_dir()


def load_scalars(run_dir: Path) -> dict[str, Curve]:
    """Every scalar of the run's event files (any depth under ``tb/``), one value per step (the
    last written), under the tags the code names them by: a tag of a nested run
    ``tb/<run>/<nested>/`` is read back with :func:`bilevel.tags.logical`."""
    by_tag: dict[str, dict[int, float]] = {}
    root = Path(run_dir) / EVENTS_DIR
    for folder in sorted({p.parent for p in event_files(run_dir)}):
        parts = folder.relative_to(root).parts
        nested = parts[-1] if len(parts) >= 2 else ""
        acc = event_accumulator.EventAccumulator(
            str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 1}
        )
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            by_tag.setdefault(tags.logical(nested, tag), {}).update({e.step: e.value for e in acc.Scalars(tag)})
    out: dict[str, Curve] = {}
    for tag, by_step in by_tag.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = steps, np.array([by_step[s] for s in steps], dtype=np.float64)
    return out


def load_run(path: str | Path) -> RunRecord:
    """Read one run directory (config, TensorBoard scalars, final metrics)."""
    path = Path(path)
    if not is_run_dir(path):
        raise NoRunsError(f"{path} is not a run directory: {RUN_DIR_CONTENTS}")
    config = OmegaConf.to_container(OmegaConf.load(path / CONFIG), resolve=False)
    metrics_path = path / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return RunRecord(path, config, load_scalars(path), {k: float(v) for k, v in metrics.items()})


def find_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """The run directories at or below each path (any depth), each loaded once, sorted by path.

    Raises :class:`NoRunsError` naming the first path that holds none.
    """
    found: dict[Path, None] = {}
    for given in map(Path, paths):
        if not given.is_dir():
            raise NoRunsError(f"{given} is not a directory: {RUN_DIR_CONTENTS}")
        candidates = [given] if is_run_dir(given) else [c.parent for c in sorted(given.rglob(CONFIG))]
        runs = [c.resolve() for c in candidates if is_run_dir(c)]
        if not runs:
            raise NoRunsError(f"no run directory in {given}: {RUN_DIR_CONTENTS}")
        found.update(dict.fromkeys(runs))
    return [load_run(p) for p in sorted(found)]


def format_value(value: Any) -> str:
    """A config value as on a Hydra command line (``null``, ``true``, ``[a,b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value)


@dataclass
class Group:
    """The runs of one setting; ``setting`` maps the label's keys to their values."""

    label: str
    setting: dict[str, Any]
    runs: list[RunRecord]


def _label_keys(settings: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between settings, minus those determined by a differing ``P.name``."""
    keys = sorted({k for s in settings for k in s})
    differing = [k for k in keys if len({format_value(s.get(k)) for s in settings}) > 1]

    def determined(key: str) -> bool:
        parent = key.rpartition(".")[0]
        name_key = f"{parent}.name"
        if not parent or key == name_key or name_key not in differing:
            return False
        by_name: dict[str, set[str]] = {}
        for s in settings:
            by_name.setdefault(format_value(s.get(name_key)), set()).add(format_value(s.get(key)))
        return all(len(values) == 1 for values in by_name.values())

    return [k for k in differing if not determined(k)]


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    """Runs with equal configs except :data:`RUN_KEYS`, in order of first appearance."""
    buckets: dict[str, tuple[dict[str, Any], list[RunRecord]]] = {}
    for run in runs:
        setting = {k: v for k, v in flatten(run.config).items()
                   if k not in RUN_KEYS and not k.startswith(RECORD_PREFIXES)}
        key = json.dumps({k: format_value(v) for k, v in setting.items()}, sort_keys=True)
        buckets.setdefault(key, (setting, []))[1].append(run)
    settings = [s for s, _ in buckets.values()]
    keys = _label_keys(settings)
    groups = []
    for setting, members in buckets.values():
        shown = {k: setting.get(k) for k in keys}
        label = " ".join(f"{k}={format_value(v)}" for k, v in shown.items()) or "all runs"
        groups.append(Group(label, shown, members))
    return groups




def short_run_warning(runs: Sequence[RunRecord]) -> Optional[str]:
    """A warning naming the runs shorter than their ``train.decompose_every``: their decomposition
    curves are a point or two (step 0, and the last step of a run without ablation), not curves."""
    def cadence(run: RunRecord) -> tuple[int, int]:
        train = run.config.get("train", {})
        return int(train.get("decompose_every", 0)), int(train.get("steps", 0))

    short = [r for r in runs if cadence(r)[1] < cadence(r)[0]]
    if not short:
        return None
    every = sorted({cadence(r)[0] for r in short})
    return (f"warning: {len(short)} of {len(runs)} runs are shorter than train.decompose_every "
            f"({', '.join(map(str, every))}): their decomposition was logged at step 0 (and at the last step "
            f"without an ablation) only, so its figures show points, not curves. Rerun with "
            f"train.decompose_every=N below train.steps to see the terms evolve. Runs: "
            + ", ".join(str(r.path) for r in short))
