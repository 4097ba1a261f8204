"""A study's statistics over a sweep: per-arm summaries over seeds and paired tests across arms.

An *arm* is a setting of :func:`bilevel.report.runs.group_runs` (runs equal but for the seed); its
runs are indexed by seed. All statistics are :mod:`bilevel.report.stats`'s (mean, sd, t-based 95 %
CI over seeds; paired t and Wilcoxon signed-rank).

* **Arms.** The final test accuracy (``metrics.json``: read once, at the end, on the test
  split) after the headline step ``k`` and after every test step; the same with test-time
  zeroing; the validation accuracy — its last value and its best over the run (the only
  "best" the report selects, and it is selected on the validation split); and the change of
  the validation curve over the last quarter of training (its last value minus its value a
  quarter of the steps earlier: near 0 when the curve has flattened), and the mean wall time of
  a run (``metrics.json``'s ``wall_seconds``: a resumed run's last attempt only).
* **Declared comparisons.** The paper's claims the study config declares, tested with Holm's
  correction and judged by one rule (:mod:`bilevel.report.study_claims`), with the paper's Δ
  beside ours.
* **Exploratory comparisons.** Every other two arms whose settings differ in exactly one key,
  paired by seed on the headline test accuracy, ``b − a`` with ``a`` the arm listed first (raw
  p-values: no multiplicity correction).
* **Test-time zeroing.** Within every arm, zeroed minus as-trained test accuracy, paired
  within each run (the same tasks, the same parameters).
* **Decomposition.** Per arm, each term's share of the encoder meta-gradient and the
  same/different-class pair weights, each averaged over the steps a run logged them, then over
  seeds; the head's norm at the end (the paper's second interference source).
* **Cosines.** Runs with the paper's cosine probe (:mod:`bilevel.app.cosine_protocol`): per probe
  step, the mean same-class (diagonal) and different-class (off-diagonal) query–support cosine
  and their gap, over seeds; the gaps of arms differing in one key are compared paired by
  seed at every probe step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bilevel.run_files import load_probe
from bilevel.report.runs import EVAL_ACCURACY, Group, RunRecord, format_value
from bilevel.report.stats import Paired, Stat, format_p, paired
from bilevel.report.study_claims import (by_seed, claims_dict, claims_markdown, declared_results, effect_sizes_markdown,
                                      metric, seed_of)
from bilevel.report.study_decomposition import decomposition_markdown, decomposition_rows
from bilevel.report.tables import span, table

TEST = "test_accuracy"
TEST_ZEROED = "test_zeroed_accuracy"


def val_change(run: RunRecord) -> Optional[float]:
    """The last validation accuracy minus the one logged at or before 3/4 of the run's last step."""
    if EVAL_ACCURACY not in run.scalars:
        return None
    steps, values = run.scalars[EVAL_ACCURACY]
    earlier = np.nonzero(steps <= 0.75 * steps[-1])[0]
    return None if earlier.size == 0 else float(values[-1] - values[earlier[-1]])


@dataclass
class ArmRow:
    """One arm's statistics (module docstring)."""

    label: str
    setting: dict[str, str]
    seeds: list[int]
    finished: int
    headline_steps: list[int]
    test_tasks: list[int]
    test: Optional[Stat]
    test_per_step: list[Optional[Stat]]
    test_zeroed: Optional[Stat]
    val_final: Optional[Stat]
    val_best: Optional[Stat]
    val_change_last_quarter: Optional[Stat]
    wall_seconds: Optional[Stat]


def test_steps(group: Group) -> int:
    """How many test steps (0 … K) the group's metrics report."""
    return max((int(k.rsplit("_", 1)[1]) + 1 for r in group.runs for k in r.metrics
                if k.startswith("test_accuracy_step_")), default=0)


def arm_row(group: Group) -> ArmRow:
    """The arm's row."""
    finished = [r for r in group.runs if TEST in r.metrics]
    return ArmRow(
        label=group.label,
        setting={k: format_value(v) for k, v in group.setting.items()},
        seeds=sorted(seed_of(r) for r in group.runs),
        finished=len(finished),
        headline_steps=sorted({int(r.metrics["test_headline_step"]) for r in finished if "test_headline_step" in r.metrics}),
        test_tasks=sorted({int(r.metrics["test_tasks"]) for r in finished if "test_tasks" in r.metrics}),
        test=Stat.of(by_seed(group, metric(TEST)).values()),
        test_per_step=[Stat.of(by_seed(group, metric(f"test_accuracy_step_{k}")).values())
                       for k in range(test_steps(group))],
        test_zeroed=Stat.of(by_seed(group, metric(TEST_ZEROED)).values()),
        val_final=Stat.of(by_seed(group, lambda r: r.final(EVAL_ACCURACY)).values()),
        val_best=Stat.of(by_seed(group, lambda r: r.best(EVAL_ACCURACY)).values()),
        val_change_last_quarter=Stat.of(by_seed(group, val_change).values()),
        wall_seconds=Stat.of(by_seed(group, metric("wall_seconds")).values()),
    )


@dataclass
class Comparison:
    """``b − a`` for two arms that differ only in ``key`` (``context``: the keys they share)."""

    key: str
    a: str
    b: str
    context: str
    quantity: str
    result: Paired


def differing_key(a: dict[str, Any], b: dict[str, Any]) -> Optional[str]:
    """The one key whose value differs between two settings (None unless exactly one does)."""
    keys = [k for k in sorted(a.keys() | b.keys()) if format_value(a.get(k)) != format_value(b.get(k))]
    return keys[0] if len(keys) == 1 else None


def one_key_pairs(groups: Sequence[Group]) -> list[tuple[str, Group, Group]]:
    """Every ``(key, a, b)`` of groups (in their order) that differ in exactly one key."""
    out = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            key = differing_key(a.setting, b.setting)
            if key is not None:
                out.append((key, a, b))
    return out


def _context(group: Group, key: str) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in group.setting.items() if k != key) or "—"


def paired_comparisons(groups: Sequence[Group], per_seed: Callable[[Group], dict[int, float]],
                       quantity: str, skip: frozenset | set = frozenset()) -> list[Comparison]:
    """Paired comparisons of ``per_seed`` (an arm's ``{seed: value}``) across every one-key pair of
    arms but those in ``skip`` (sets of two arm labels)."""
    out = []
    for key, a, b in one_key_pairs(groups):
        if frozenset((a.label, b.label)) in skip:
            continue
        result = paired(per_seed(a), per_seed(b))
        if result is not None:
            out.append(Comparison(key, format_value(a.setting[key]), format_value(b.setting[key]), _context(a, key),
                                  quantity, result))
    return out


def comparisons(groups: Sequence[Group], name: str = TEST) -> list[Comparison]:
    """Paired comparisons of ``metrics.json``'s ``name`` across every one-key pair of arms."""
    return paired_comparisons(groups, lambda g: by_seed(g, metric(name)), name)


def exploratory(groups: Sequence[Group]) -> list[Comparison]:
    """:func:`comparisons` of the headline test accuracy but the pairs a declared difference tests."""
    tested = {frozenset(pair) for t in declared_results(groups) if len(t.arms) == 1 for pair in t.arms}
    return paired_comparisons(groups, lambda g: by_seed(g, metric(TEST)), TEST, skip=tested)


def zeroing_effects(groups: Sequence[Group]) -> list[tuple[str, Paired]]:
    """Per arm, test-time zeroing: zeroed minus as-trained headline test accuracy, paired per run."""
    out = []
    for g in groups:
        result = paired(by_seed(g, metric(TEST)), by_seed(g, metric(TEST_ZEROED)))
        if result is not None:
            out.append((g.label, result))
    return out


# ---- cosine probe ----------------------------------------------------------------------------

def probe_summary(probe: dict[str, Any], step: str) -> dict[str, float]:
    """Same-class (diagonal) and different-class (off-diagonal) means of the query–support map
    at ``step``, and their gap ``same − diff``; the same for the query–query map (``qq_*``)."""
    out = {}
    for name, prefix in (("query_support", ""), ("query_query", "qq_")):
        m = np.asarray(probe["steps"][step][name], dtype=np.float64)
        off = ~np.eye(m.shape[0], dtype=bool)
        same, diff = float(np.diag(m).mean()), float(m[off].mean())
        out.update({f"{prefix}same": same, f"{prefix}diff": diff, f"{prefix}gap": same - diff})
    return out


def probes(group: Group) -> dict[int, dict[str, Any]]:
    """``{seed: cosine_probe.json}`` of the group's runs that have one."""
    out = {}
    for run in group.runs:
        probe = load_probe(run.path)
        if probe is not None and probe.get("steps"):
            out[seed_of(run)] = probe
    return out


def probed(groups: Sequence[Group]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{label: probes(group)}`` of the groups that have probes (each file read once)."""
    return {g.label: found for g in groups if (found := probes(g))}


def probe_steps(found: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The probe steps any run of :func:`probed`'s ``found`` recorded, in numeric order (a run still
    in progress has the early ones only: each step's statistics use the runs that recorded it)."""
    return sorted({step for by_seed_ in found.values() for probe in by_seed_.values() for step in probe["steps"]},
                  key=int)


@dataclass
class CosineRow:
    """One arm at one probe step: statistics over seeds of :func:`probe_summary`."""

    label: str
    step: int
    values: dict[str, Optional[Stat]]


def cosine_rows(groups: Sequence[Group]) -> list[CosineRow]:
    """Per arm with probes and per probe step, the seed statistics of the summaries."""
    found, rows = probed(groups), []
    for step in probe_steps(found):
        for label, by_seed_ in found.items():
            per_seed = [probe_summary(p, step) for p in by_seed_.values() if step in p["steps"]]
            if per_seed:
                rows.append(CosineRow(label, int(step), {k: Stat.of(s[k] for s in per_seed) for k in per_seed[0]}))
    return rows


def cosine_comparisons(groups: Sequence[Group], quantity: str = "gap") -> list[tuple[int, Comparison]]:
    """Paired comparisons of the probe's ``quantity`` across one-key pairs, at every probe step."""
    found = probed(groups)

    def at(step: str) -> Callable[[Group], dict[int, float]]:
        return lambda g: {s: probe_summary(p, step)[quantity] for s, p in found.get(g.label, {}).items()
                          if step in p["steps"]}

    return [(int(step), c) for step in probe_steps(found)
            for c in paired_comparisons(groups, at(step), f"cosine {quantity}")]


# ---- output ------------------------------------------------------------------------------------

def _stat(stat: Optional[Stat], digits: int = 3) -> str:
    return "—" if stat is None else stat.cell(digits)


def signed(x: float) -> str:
    """``+0.012``; differences below 0.0005 in size (e.g. round-off between equal updates) in
    scientific notation, ``-3.2e-06``, so that they do not read as exactly 0."""
    return f"{x:+.1e}" if x != 0 and abs(x) < 5e-4 else f"{x:+.3f}"


def _paired_cells(p: Paired) -> list[str]:
    return [str(p.n), f"{signed(p.diff.mean)} [{signed(p.diff.ci_low)}, {signed(p.diff.ci_high)}]", format_p(p.p_t),
            format_p(p.p_wilcoxon), f"{p.wins}/{p.n}"]


PAIRED_HEADER = ["seeds", "mean b − a [95% CI]", "paired t p", "Wilcoxon p", "b > a"]


def arms_markdown(rows: Sequence[ArmRow]) -> str:
    """The arms table: test after k steps (mean ± sd [95 % CI] over seeds), per step, zeroed, val."""
    header = ["arm", "seeds (finished)", "test tasks", "k", "test acc after k steps", "test acc per step 0 / 1 / …",
              "test acc, zeroed head", "val acc (last)", "val acc (best)", "Δ val, last quarter", "wall s / run"]
    body = [[r.label, f"{len(r.seeds)} ({r.finished})", span(r.test_tasks), span(r.headline_steps), _stat(r.test),
             " / ".join("—" if s is None else f"{s.mean:.3f}" for s in r.test_per_step) or "—",
             _stat(r.test_zeroed), _stat(r.val_final), _stat(r.val_best), _stat(r.val_change_last_quarter),
             "—" if r.wall_seconds is None else f"{r.wall_seconds.mean:.0f}"]
            for r in rows]
    return table(header, body)


def comparisons_markdown(items: Sequence[Comparison]) -> str:
    """Paired comparisons, one row per pair."""
    body = [[c.key, c.a, c.b, c.context] + _paired_cells(c.result) for c in items]
    return table(["differs in", "a", "b", "shared setting"] + PAIRED_HEADER, body)


def zeroing_markdown(items: Sequence[tuple[str, Paired]]) -> str:
    """Test-time zeroing per arm (b = zeroed head, a = head as trained)."""
    return table(["arm"] + PAIRED_HEADER, [[label] + _paired_cells(p) for label, p in items])


def cosine_markdown(rows: Sequence[CosineRow], compared: Sequence[tuple[int, Comparison]]) -> str:
    """The probe's same/different-class cosines per arm and step, then the paired gap comparisons."""
    body = [[r.label, str(r.step), str(r.values["same"].n), _stat(r.values["same"]), _stat(r.values["diff"]), _stat(r.values["gap"]),
             _stat(r.values["qq_gap"])] for r in rows]
    text = table(["arm", "outer updates", "seeds", "query–support same class", "query–support different class",
                  "gap (same − different)", "query–query gap"], body)
    if compared:
        text += "\nPaired by seed, the query–support gap (b − a):\n\n" + table(
            ["outer updates", "differs in", "a", "b", "shared setting"] + PAIRED_HEADER,
            [[str(step), c.key, c.a, c.b, c.context] + _paired_cells(c.result) for step, c in compared])
    return text


SECTIONS = (
    ("Declared comparisons (the paper's claims, declared in the study config; p Holm-adjusted over this table; "
     "verdicts by one rule: bilevel.report.study_claims.verdict)",
     declared_results, lambda rows, _: claims_markdown(rows)),
    ("Effect sizes: the paper's Δ next to ours (95% CI over seeds)",
     declared_results, lambda rows, _: effect_sizes_markdown(rows)),
    ("Exploratory: paired comparisons of the headline test accuracy, every other pair of arms differing in one "
     "key (b − a, paired by seed; raw p, no multiplicity correction)",
     exploratory, lambda rows, _: comparisons_markdown(rows)),
    ("Test-time zeroing (zeroed − as trained, paired within each run)",
     zeroing_effects, lambda rows, _: zeroing_markdown(rows)),
    ("Decomposition over training (per run: mean over the logged steps; then mean ± sd over seeds)",
     decomposition_rows, lambda rows, _: decomposition_markdown(rows)),
    ("Cosine probe (features of the meta-parameters, fixed task)",
     cosine_rows, lambda rows, groups: cosine_markdown(rows, cosine_comparisons(groups))),
)
"""The sections after the arms table: heading, rows of the groups, the rows' Markdown (an empty
section is left out)."""


def study_markdown(groups: Sequence[Group], arms: bool = True) -> str:
    """Every section that has data: arms (unless ``arms`` is false: ``bilevel-report``'s own table
    shows them), paired comparisons, test-time zeroing, cosines."""
    parts = ["### Arms (mean ± sd [95% CI] over seeds; test = final test split, read once)\n\n"
             + arms_markdown([arm_row(g) for g in groups])] if arms else []
    for heading, rows_of, markdown in SECTIONS:
        rows = rows_of(groups)
        if rows:
            parts.append(f"### {heading}\n\n" + markdown(rows, groups))
    return "\n".join(parts)


def study_dict(groups: Sequence[Group]) -> dict[str, Any]:
    """Everything :func:`study_markdown` shows, as JSON-ready data."""
    return {
        "arms": [asdict(arm_row(g)) for g in groups],
        "declared": claims_dict(declared_results(groups)),
        "comparisons": [asdict(c) for c in exploratory(groups)],
        "test_time_zeroing": [{"arm": label, **asdict(p)} for label, p in zeroing_effects(groups)],
        "decomposition": [asdict(r) for r in decomposition_rows(groups)],
        "cosine": [asdict(r) for r in cosine_rows(groups)],
        "cosine_comparisons": [{"step": s, **asdict(c)} for s, c in cosine_comparisons(groups)],
    }
