"""The report's table: one row per setting (:func:`summarise`), as Markdown and JSON.

Statistics over the seeds of a setting are :class:`~bilevel.report.stats.Stat`'s: the mean and
the sample standard deviation (``ddof = 1``; none for a single seed); a test accuracy also shows
its t-based 95 % CI over seeds or, for a single seed, the run's own 95 % CI over its test tasks,
marked ``†`` and said under the table (:func:`test_stat`). "Final" is a run's value at its last
logged step; "best" is its maximum over steps. Test accuracies come from ``metrics.json``: the
headline (after ``k`` inner steps, the step count training used) and the accuracy after every
test step, so settings that test after different step counts are compared step by step, not
headline to headline.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

from bilevel import tags
from bilevel.report.runs import COS_DIFF, COS_SAME, EVAL_ACCURACY, Group, RunRecord, format_value
from bilevel.report.stats import Stat

HEADLINE_STEP = tags.HEADLINE_STEP_METRIC
TEST_ACCURACY = tags.metric_key(tags.accuracy(tags.TEST))
TEST_ZEROED_ACCURACY = tags.metric_key(tags.accuracy(tags.zeroed(tags.TEST)))
TEST_TASKS = tags.metric_key(tags.tasks(tags.TEST))

SETTINGS_HEADING = "Settings (one row per setting: its runs differ only in the seed)"
TASK_CI_NOTE = ("† one seed: ± is the half-width of the run's 95 % CI over its test tasks (how precisely the "
                "tasks measure this run, not how much another seed would change it). Several seeds: mean ± sd "
                "over seeds [t-based 95 % CI of the mean].")
"""The note under the table when a cell shows an interval."""


def test_stat(runs: Sequence[RunRecord], key: str) -> Optional[Stat]:
    """A final test accuracy ``key`` of ``metrics.json`` over the runs (:class:`Stat`) with its
    interval: over seeds, or for one run its CI over test tasks (``<key>_low``/``_high``: ``task_ci``)."""
    stat = Stat.of(r.metrics.get(key) for r in runs)
    if stat is None or stat.n > 1:
        return stat
    (run,) = [r for r in runs if key in r.metrics and not math.isnan(r.metrics[key])]
    low, high = run.metrics.get(f"{key}_low"), run.metrics.get(f"{key}_high")
    return stat if low is None or high is None else replace(stat, task_ci=(high - low) / 2)


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
    ("test acc after k steps", lambda s: _cell(s.test_accuracy, interval=True)),
    ("k", lambda s: span(s.headline_steps)),
    ("test tasks", lambda s: span(s.test_tasks)),
    ("test acc per step 0 / 1 / ...", lambda s: _per_step(s.test_accuracy_per_step)),
    ("test acc (zeroed head)", lambda s: _cell(s.test_zeroed_accuracy, interval=True)),
    ("cos same class", lambda s: _mean(s.cos_same_class)),
    ("cos diff class", lambda s: _mean(s.cos_diff_class)),
)


def span(values: Sequence[int]) -> str:
    """``3``, ``2–5`` (the range of the values), or ``—`` for none."""
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _cell(stat: Optional[Stat], interval: bool = False) -> str:
    """Mean ± sd over seeds (with its 95 % CI when ``interval``): :meth:`Stat.cell`."""
    return "—" if stat is None else stat.cell(interval=interval)


def _mean(stat: Optional[Stat]) -> str:
    return "—" if stat is None else f"{stat.mean:.3f}"


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
    intervals = any(st is not None and (st.task_ci is not None or st.ci_low is not None)
                    for s in summaries for st in (s.test_accuracy, s.test_zeroed_accuracy))
    return text + ("\n" + TASK_CI_NOTE + "\n" if intervals else "")


def report_json(summaries: Sequence[Summary]) -> str:
    """The summaries as JSON (statistics as :class:`Stat`'s fields, or null)."""
    return json.dumps([asdict(s) for s in summaries], indent=2)
