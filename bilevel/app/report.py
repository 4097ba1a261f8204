"""Report over training runs: ``bilevel-report RUN_DIR... [--out DIR] [--markdown PATH] [--json PATH]``.

A *run directory* (written by :func:`bilevel.app.train.train`) holds ``config.yaml`` and the
TensorBoard events ``tb/``; ``metrics.json`` is optional. Every given path is either a run
directory or a directory searched at any depth for them (a Hydra multirun sweep).

Runs whose flattened configs are equal except :data:`RUN_KEYS` (the seed and run-specific
keys: the resume mode, the execution path) form a *setting*. A setting is labelled by the keys that differ between settings,
``key=value`` in key order; a key ``P.k`` is left out of labels when ``P.name`` also differs
and determines it (a Hydra group option is named by ``name``: ``ablation.name=no_init``
stands for its ``keep``/``drop``).

Statistics over the seeds of a setting are the mean and the sample standard deviation
(``ddof = 1``; none for a single seed); a test accuracy also shows its t-based 95 % CI over
seeds or, for a single seed, the run's own 95 % CI over its test tasks, marked ``†`` and said
under the table (:func:`test_stat`). "Final" is a run's value at its last logged step;
"best" is its maximum over steps. Curves are averaged over the steps that every run of the
setting logged. Test accuracies come from ``metrics.json``: the headline (after ``k`` inner
steps, the step count training used) and the accuracy after every test step, so settings
that test after different step counts are compared step by step, not headline to headline.
Runs shorter than their ``train.decompose_every`` are named in a warning (their
decomposition is a point or two, not a curve).

After that table come a study's statistics (:mod:`bilevel.app.study`: paired t and Wilcoxon
tests across arms sharing seeds, test-time zeroing, the decomposition, the cosine probe; its own
arms table, which repeats this one, only in ``--markdown``), written as ``study.json``, and the
figures (:mod:`bilevel.app.report_figures`, :mod:`bilevel.app.study_figures`: learning curves
with CI bands, term shares, feature cosines, the cosine heat maps). Everything is also written
as one self-contained page, ``report.html`` (:mod:`bilevel.app.report_html`), next to the figures.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from tensorboard.backend.event_processing import event_accumulator

from bilevel import tags
from bilevel.app.config import flatten
from bilevel.app.tb import EVENTS_DIR, event_files
from bilevel.app.stats import t_quantile

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
RUN_KEYS = ("seed", "train.resume", "execution")
RECORD_PREFIXES = ("study.", "provenance.")
"""Config sections that describe a run without defining its setting: the study's declared
comparisons and the code it ran (:mod:`bilevel.app.provenance`)."""
RUN_DIR_CONTENTS = f"a run directory must contain {CONFIG_FILE} and a {EVENTS_DIR}/ folder of TensorBoard events"

EVAL_ACCURACY = tags.accuracy(tags.EVAL)
COS_SAME, COS_DIFF = tags.COS_SAME_CLASS, tags.COS_DIFF_CLASS
SHARE_PREFIX, SHARE_SUFFIX = tags.TERMS_PREFIX, f"/{tags.SHARE}"
HEADLINE_STEP = tags.HEADLINE_STEP_METRIC
TEST_ACCURACY = tags.metric_key(tags.accuracy(tags.TEST))
TEST_ZEROED_ACCURACY = tags.metric_key(tags.accuracy(tags.zeroed(tags.TEST)))
TEST_TASKS = tags.metric_key(tags.tasks(tags.TEST))

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
    return (path / CONFIG_FILE).is_file() and (path / EVENTS_DIR).is_dir()


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
    config = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE), resolve=False)
    metrics_path = path / METRICS_FILE
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
        candidates = [given] if is_run_dir(given) else [c.parent for c in sorted(given.rglob(CONFIG_FILE))]
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


@dataclass
class Stat:
    """Mean and sample standard deviation (None for one value) over ``n`` seeds; for a test
    accuracy also the t-based 95 % CI of the mean over seeds (``ci``: its half-width) or, with one
    seed, the half-width ``task_ci`` of the run's own 95 % CI over its test tasks."""

    mean: float
    sd: Optional[float]
    n: int
    ci: Optional[float] = None
    task_ci: Optional[float] = None

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> Optional["Stat"]:
        """Over the values that are present; None when none is."""
        xs = np.array([v for v in values if v is not None], dtype=np.float64)
        if xs.size == 0:
            return None
        return cls(float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else None, int(xs.size))

    def __str__(self) -> str:
        if self.sd is None:
            return f"{self.mean:.3f}" if self.task_ci is None else f"{self.mean:.3f} ± {self.task_ci:.3f} †"
        text = f"{self.mean:.3f} ± {self.sd:.3f}"
        return text if self.ci is None else f"{text} [{self.mean - self.ci:.3f}, {self.mean + self.ci:.3f}]"


SETTINGS_HEADING = "Settings (one row per setting: its runs differ only in the seed)"
TASK_CI_NOTE = ("† one seed: ± is the half-width of the run's 95 % CI over its test tasks (how precisely the "
                "tasks measure this run, not how much another seed would change it). Several seeds: mean ± sd "
                "over seeds [t-based 95 % CI of the mean].")
"""The note under the table when a cell shows an interval."""


def test_stat(runs: Sequence[RunRecord], key: str) -> Optional[Stat]:
    """A final test accuracy ``key`` of ``metrics.json`` over the runs (:class:`Stat`) with its
    interval: over seeds, or for one run its CI over test tasks (``<key>_low``/``_high``)."""
    stat = Stat.of(r.metrics.get(key) for r in runs)
    if stat is None:
        return None
    if stat.n > 1 and stat.sd is not None:
        stat.ci = t_quantile(stat.n) * stat.sd / math.sqrt(stat.n)
    else:
        (run,) = [r for r in runs if key in r.metrics]
        low, high = run.metrics.get(f"{key}_low"), run.metrics.get(f"{key}_high")
        stat.task_ci = None if low is None or high is None else (high - low) / 2
    return stat


@dataclass
class Summary:
    """One row of the report."""

    label: str
    setting: dict[str, Any]
    runs: list[str]
    seeds: int
    steps: list[int]
    final_eval_accuracy: Optional[Stat]
    best_eval_accuracy: Optional[Stat]
    headline_steps: list[int]
    test_tasks: list[int]
    test_accuracy: Optional[Stat]
    test_accuracy_per_step: list[Optional[Stat]]
    test_zeroed_accuracy: Optional[Stat]
    cos_same_class: Optional[Stat]
    cos_diff_class: Optional[Stat]


def summarise(group: Group) -> Summary:
    """The table row of a group (statistics over its seeds)."""
    runs = group.runs
    return Summary(
        label=group.label,
        setting={k: format_value(v) for k, v in group.setting.items()},
        runs=[str(r.path) for r in runs],
        seeds=len(runs),
        steps=[r.last_step for r in runs],
        final_eval_accuracy=Stat.of(r.final(EVAL_ACCURACY) for r in runs),
        best_eval_accuracy=Stat.of(r.best(EVAL_ACCURACY) for r in runs),
        headline_steps=sorted({int(r.metrics[HEADLINE_STEP]) for r in runs if HEADLINE_STEP in r.metrics}),
        test_tasks=sorted({int(r.metrics[TEST_TASKS]) for r in runs if TEST_TASKS in r.metrics}),
        test_accuracy=test_stat(runs, TEST_ACCURACY),
        test_accuracy_per_step=[Stat.of(r.metrics.get(_test_accuracy_step(k)) for r in runs)
                                for k in range(_test_steps(runs))],
        test_zeroed_accuracy=test_stat(runs, TEST_ZEROED_ACCURACY),
        cos_same_class=Stat.of(r.final(COS_SAME) for r in runs),
        cos_diff_class=Stat.of(r.final(COS_DIFF) for r in runs),
    )


def _test_accuracy_step(step: int) -> str:
    """The ``metrics.json`` key of the final test's accuracy after ``step`` inner steps."""
    return tags.metric_key(tags.accuracy_step(tags.TEST, step))


def _test_steps(runs: Sequence[RunRecord]) -> int:
    """How many test steps (0, 1, ...) the runs' ``metrics.json`` report accuracies for."""
    prefix = _test_accuracy_step(0).removesuffix("0")  # the key without its step number
    return max((int(k[len(prefix):]) + 1 for r in runs for k in r.metrics if k.startswith(prefix)), default=0)


def _per_step(stats: list[Optional[Stat]]) -> str:
    return " / ".join("—" if st is None else f"{st.mean:.3f}" for st in stats) or "—"


COLUMNS = (
    ("setting", lambda s: s.label),
    ("seeds", lambda s: str(s.seeds)),
    ("steps", lambda s: span(s.steps)),
    ("final eval acc", lambda s: _cell(s.final_eval_accuracy)),
    ("best eval acc", lambda s: _cell(s.best_eval_accuracy)),
    ("test acc after k steps", lambda s: _cell(s.test_accuracy)),
    ("k", lambda s: span(s.headline_steps)),
    ("test tasks", lambda s: span(s.test_tasks)),
    ("test acc per step 0 / 1 / ...", lambda s: _per_step(s.test_accuracy_per_step)),
    ("test acc (zeroed head)", lambda s: _cell(s.test_zeroed_accuracy)),
    ("cos same class", lambda s: _cell(s.cos_same_class, sd=False)),
    ("cos diff class", lambda s: _cell(s.cos_diff_class, sd=False)),
)


def span(values: Sequence[int]) -> str:
    """``3``, ``2–5`` (the range of the values), or ``—`` for none."""
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _cell(stat: Optional[Stat], sd: bool = True) -> str:
    if stat is None:
        return "—"
    return str(stat) if sd else f"{stat.mean:.3f}"


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table, its columns padded so that it also reads as plain text."""
    rows = [list(header)] + [list(row) for row in body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def markdown_table(summaries: Sequence[Summary]) -> str:
    """The summary table, a row per setting (:data:`COLUMNS`), and :data:`TASK_CI_NOTE` when a
    cell shows an interval over test tasks or over seeds."""
    body = [[cell(s) for _, cell in COLUMNS] for s in summaries]
    text = table([name for name, _ in COLUMNS], body)
    intervals = any(st is not None and (st.task_ci is not None or st.ci is not None)
                    for s in summaries for st in (s.test_accuracy, s.test_zeroed_accuracy))
    return text + ("\n" + TASK_CI_NOTE + "\n" if intervals else "")


def report_json(summaries: Sequence[Summary]) -> str:
    """The summaries as JSON (statistics as ``{mean, sd, n}`` or null)."""
    return json.dumps([asdict(s) for s in summaries], indent=2)


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
