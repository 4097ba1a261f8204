"""A study's declared comparisons, tested with Holm's correction and judged by one rule.

A study config (``configs/experiment/*.yaml``) declares, before it is run, the paper's claims it
tests under ``study.comparisons``; every run records them in its ``config.yaml``. Each entry:

* ``name``; ``a`` and ``b``: the two arms, as ``{config key: value}`` that the arm's settings
  must hold; ``where`` (optional): keys both must hold; the arms must agree on every key not
  named in ``a`` or ``b``, so one entry may match several pairs (each is tested).
* ``claim``: the paper's direction of the tested quantity: ``>`` (positive), ``<`` or ``=``
  (no difference; needs ``margin``, the largest difference that counts as none).
* ``kind``: ``difference`` (default), the headline test accuracy ``b − a`` paired by seed; or
  ``interaction``, with ``across: {key: [level1, level2]}``, the difference of differences
  ``(b − a)|level1 − (b − a)|level2``: paired by seed when the four arms share seeds,
  otherwise Welch's test on the two levels' per-seed differences.
* ``paper`` (optional): ``{a, b}`` accuracies or ``{delta}``, and ``source``; its Δ is shown
  beside ours and sets the smallest effect of interest, ``margin`` (default ``|Δ| / 2``).

The declared tests of a report form one family: their p-values (paired t, or Welch) are
Holm-adjusted (:func:`bilevel.report.stats.holm`); every other comparison the report shows is
exploratory. :func:`verdict` is the only place a verdict is decided. Every test step is
tested too (raw p, outside the family), and a change of sign across the steps is reported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from bilevel.run_files import flatten
from bilevel.report.runs import RECORD_PREFIXES, RUN_KEYS, Group, RunRecord, format_value
from bilevel.report.stats import holm, paired, welch
from bilevel.report.tables import table

ALPHA = 0.05
MIN_SEEDS = 8   # a verdict needs at least this many seeds (pairs, or the smaller level of a Welch test)
CLAIMS = (">", "<", "=")
KINDS = ("difference", "interaction")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass(frozen=True)
class Declared:
    """One declared comparison (module docstring); values are compared as formatted strings."""

    name: str
    a: dict[str, str]
    b: dict[str, str]
    claim: str
    where: dict[str, str]
    kind: str = "difference"
    across: Optional[tuple[str, str, str]] = None
    paper_delta: Optional[float] = None
    paper_a: Optional[float] = None
    paper_b: Optional[float] = None
    source: str = ""
    margin: Optional[float] = None


def _spec(raw: Any, name: str, field_name: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"declared comparison {name!r}: {field_name} must be a mapping of config keys to values")
    return {str(k): format_value(v) for k, v in raw.items()}


def parse_declared(raw: Mapping[str, Any]) -> Declared:
    """A :class:`Declared` from a config entry; a ``ValueError`` names what is wrong."""
    name = str(raw.get("name", "")) or "(unnamed)"
    kind, claim = raw.get("kind", "difference"), str(raw.get("claim", ""))
    if kind not in KINDS:
        raise ValueError(f"declared comparison {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if claim not in CLAIMS:
        raise ValueError(f"declared comparison {name!r}: claim must be one of {', '.join(CLAIMS)}, got {claim!r}")
    a, b = _spec(raw.get("a"), name, "a"), _spec(raw.get("b"), name, "b")
    if not a or not b:
        raise ValueError(f"declared comparison {name!r}: a and b must each name at least one config key")
    across = None
    if kind == "interaction":
        levels = raw.get("across")
        if not isinstance(levels, Mapping) or len(levels) != 1 or len(next(iter(levels.values()))) != 2:
            raise ValueError(f"declared comparison {name!r}: an interaction needs across: {{key: [level1, level2]}}")
        key, (first, second) = next(iter(levels.items()))
        across = (str(key), format_value(first), format_value(second))
    paper = raw.get("paper") or {}
    paper_a, paper_b = paper.get("a"), paper.get("b")
    delta = paper.get("delta", None if paper_a is None or paper_b is None else paper_b - paper_a)
    margin = raw.get("margin", None if delta is None else abs(delta) / 2)
    if claim == "=" and margin is None:
        raise ValueError(f"declared comparison {name!r}: claim '=' needs a margin (the largest difference that "
                         "counts as none)")
    return Declared(name, a, b, claim, _spec(raw.get("where"), name, "where"), kind, across,
                    None if delta is None else float(delta), paper_a, paper_b, str(paper.get("source", "")),
                    None if margin is None else float(margin))


def declarations(groups: Sequence[Group]) -> list[Declared]:
    """The comparisons the runs' configs declare (``study.comparisons``), each name once."""
    found: dict[str, Declared] = {}
    for group in groups:
        for run in group.runs:
            for raw in (run.config.get("study") or {}).get("comparisons") or []:
                declared = parse_declared(raw)
                found.setdefault(declared.name, declared)
    return list(found.values())


# ---- the verdict rule -----------------------------------------------------------------------

def verdict(claim: str, mean: float, ci_low: float, ci_high: float, p_adjusted: Optional[float],
            margin: Optional[float], seeds: int, alpha: float = ALPHA) -> str:
    """The verdict on a declared claim from its Holm-adjusted p-value and 95 % CI over ``seeds``.

    With fewer than :data:`MIN_SEEDS` seeds the verdict is *inconclusive*, whatever the test says.
    ``>`` / ``<`` (sign ``s`` = +1 / −1): *reproduced* when ``p_adj < α`` and the mean has sign
    ``s``; *not reproduced* when ``p_adj < α`` with the opposite sign, or when the CI excludes
    every effect of size ``margin`` in the paper's direction (``s·CI`` lies below ``margin``);
    otherwise *inconclusive*. ``=``: *reproduced* when the CI lies inside ``(−margin, margin)``;
    *not reproduced* when ``p_adj < α`` (a difference is established) and it does not;
    otherwise *inconclusive*.
    """
    if seeds < MIN_SEEDS:
        return INCONCLUSIVE
    significant = p_adjusted is not None and p_adjusted < alpha
    if claim == "=":
        if margin is not None and -margin < ci_low and ci_high < margin:
            return REPRODUCED
        return NOT_REPRODUCED if significant else INCONCLUSIVE
    sign = 1.0 if claim == ">" else -1.0
    if significant:
        return REPRODUCED if sign * mean > 0 else NOT_REPRODUCED
    far_end = max(sign * ci_low, sign * ci_high)
    if margin is not None and margin > 0 and far_end < margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


# ---- matching arms and testing --------------------------------------------------------------

def full_setting(group: Group) -> dict[str, str]:
    """Every config key of the group's runs (they share them), formatted, but the run keys."""
    return {k: format_value(v) for k, v in flatten(group.runs[0].config).items()
            if k not in RUN_KEYS and not k.startswith(RECORD_PREFIXES)}


def _holds(setting: Mapping[str, str], spec: Mapping[str, str]) -> bool:
    return all(setting.get(k) == v for k, v in spec.items())


def _agree(x: Mapping[str, str], y: Mapping[str, str], free: set[str]) -> bool:
    return all(x.get(k) == y.get(k) for k in (x.keys() | y.keys()) - free)


def _free_keys(declared: Declared, settings: Sequence[Mapping[str, str]]) -> set[str]:
    """The keys the arms may differ in: the declared ones, and the fields of a preset a declared
    ``<section>.name`` picks (``ablation.name=contrastive_only`` brings its ``ablation.keep``)."""
    named = set(declared.a) | set(declared.b)
    sections = {k[: -len("name")] for k in named if k.endswith(".name")}
    return named | {k for s in settings for k in s if k.startswith(tuple(sections))} if sections else named


def matched_pairs(groups: Sequence[Group], declared: Declared, where: Mapping[str, str]) -> list[tuple[Group, Group]]:
    """Every ``(A, B)`` with A holding ``where ∪ a``, B holding ``where ∪ b``, agreeing elsewhere
    (:func:`_free_keys`)."""
    settings = [(g, full_setting(g)) for g in groups]
    free = _free_keys(declared, [s for _, s in settings])
    return [(ga, gb) for ga, sa in settings if _holds(sa, {**where, **declared.a})
            for gb, sb in settings if gb is not ga and _holds(sb, {**where, **declared.b}) and _agree(sa, sb, free)]


@dataclass(frozen=True)
class Effect:
    """A tested quantity over seeds: mean, t-based 95 % CI, two-sided p (``test``: paired t or
    Welch t), the seeds (``n``: pairs, or the smaller level's count for Welch) and, paired, the
    Wilcoxon p and how many seeds are positive."""

    test: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    p: float
    p_wilcoxon: Optional[float] = None
    positive: Optional[int] = None


def seed_of(run: RunRecord) -> int:
    """The run's seed (its config's ``seed``)."""
    return int(run.config.get("seed", 0))


def by_seed(group: Group, value: Callable[[RunRecord], Optional[float]]) -> dict[int, float]:
    """``{seed: value(run)}`` over the group's runs that have the value."""
    out = {}
    for run in group.runs:
        v = value(run)
        if v is not None:
            out[seed_of(run)] = float(v)
    return out


def metric(name: str) -> Callable[[RunRecord], Optional[float]]:
    """A run's ``metrics.json`` entry ``name`` (None for a run that has not finished)."""
    return lambda run: run.metrics.get(name)


def paired_effect(a: Mapping[int, float], b: Mapping[int, float]) -> Optional[Effect]:
    """``b − a`` paired by seed (:func:`bilevel.report.stats.paired`), as an :class:`Effect`."""
    result = paired(a, b)
    if result is None or result.p_t is None or result.diff.ci_low is None:
        return None
    d = result.diff
    return Effect("paired t", result.n, d.mean, d.ci_low, d.ci_high, result.p_t, result.p_wilcoxon, result.wins)


def difference(pair: tuple[Group, Group], name: str) -> dict[int, float]:
    """Per seed, ``b − a`` of ``metrics.json``'s ``name``."""
    a, b = by_seed(pair[0], metric(name)), by_seed(pair[1], metric(name))
    return {s: b[s] - a[s] for s in sorted(a.keys() & b.keys())}


def interaction_effect(first: tuple[Group, Group], second: tuple[Group, Group], name: str) -> Optional[Effect]:
    """``(b − a)|first − (b − a)|second`` of ``name``: paired by seed when both levels share 2
    seeds, else Welch's test."""
    d1, d2 = difference(first, name), difference(second, name)
    if len(d1.keys() & d2.keys()) >= 2:
        return paired_effect(d2, d1)
    result = welch(list(d2.values()), list(d1.values()))
    if result is None:
        return None
    return Effect("Welch t", min(result.n_a, result.n_b), result.mean, result.ci_low, result.ci_high, result.p)


@dataclass
class Tested:
    """One matched instance of a declared comparison (``arms``: the labels of its pair of arms, or of
    the pair at each level of an interaction): the headline effect, the effect after
    every test step 0 … K−1, its Holm-adjusted p and the verdict."""

    declared: Declared
    context: str
    arms: list[tuple[str, str]]
    effect: Effect
    per_step: list[Optional[Effect]]
    p_holm: Optional[float] = None
    verdict: str = INCONCLUSIVE


def _context(group: Group, free: set[str]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in group.setting.items() if k not in free) or "—"


def _steps(groups: Sequence[Group]) -> int:
    return max((int(k.rsplit("_", 1)[1]) + 1 for g in groups for r in g.runs for k in r.metrics
                if k.startswith("test_accuracy_step_")), default=0)


def instances(groups: Sequence[Group], declared: Declared) -> list[tuple[str, list[tuple[Group, Group]]]]:
    """``(context, pairs)`` per match: one ``(A, B)`` pair for a difference, the pair at each of the
    two levels for an interaction (joined where they agree on every key but the level's)."""
    free = set(declared.a) | set(declared.b)
    if declared.across is None:
        return [(_context(a, free), [(a, b)]) for a, b in matched_pairs(groups, declared, declared.where)]
    key, first, second = declared.across
    level = [matched_pairs(groups, declared, {**declared.where, key: value}) for value in (first, second)]
    return [(_context(p1[0], free | {key}), [p1, p2]) for p1 in level[0] for p2 in level[1]
            if _agree(full_setting(p1[0]), full_setting(p2[0]), free | {key})]


def _effect(pairs: list[tuple[Group, Group]], name: str) -> Optional[Effect]:
    if len(pairs) == 1:
        a, b = pairs[0]
        return paired_effect(by_seed(a, metric(name)), by_seed(b, metric(name)))
    return interaction_effect(pairs[0], pairs[1], name)


def declared_results(groups: Sequence[Group], name: str = "test_accuracy") -> list[Tested]:
    """Every declared comparison's instances, tested on ``metrics.json``'s ``name`` and at every test step, with
    Holm's adjustment over all of them (one family) and :func:`verdict`."""
    out, steps = [], _steps(groups)
    for declared in declarations(groups):
        for context, pairs in instances(groups, declared):
            effect = _effect(pairs, name)
            if effect is not None:
                per_step = [_effect(pairs, f"test_accuracy_step_{k}") for k in range(steps)]
                out.append(Tested(declared, context, [(a.label, b.label) for a, b in pairs], effect, per_step))
    for tested, p in zip(out, holm([t.effect.p for t in out])):
        e = tested.effect
        tested.p_holm = p
        tested.verdict = verdict(tested.declared.claim, e.mean, e.ci_low, e.ci_high, p, tested.declared.margin, e.n)
    return out


def sign_pattern(per_step: Sequence[Optional[Effect]], alpha: float = ALPHA) -> str:
    """How the effect's sign behaves over test steps 1 … K−1 (step 0, before any adaptation, is
    left out): ``reverses`` when two steps differ significantly (raw p < α) in opposite
    directions, ``mean changes sign`` when only the means do, else ``same sign``."""
    steps = [(k, e) for k, e in enumerate(per_step) if k >= 1 and e is not None]
    positive = [k for k, e in steps if e.p < alpha and e.mean > 0]
    negative = [k for k, e in steps if e.p < alpha and e.mean < 0]
    if positive and negative:
        return (f"reverses: + at step{'s' * (len(positive) > 1)} {', '.join(map(str, positive))}, "
                f"− at step{'s' * (len(negative) > 1)} {', '.join(map(str, negative))}")
    signs = {math.copysign(1.0, e.mean) for _, e in steps if e.mean != 0}
    return "mean changes sign (not significant)" if len(signs) > 1 else "same sign"


# ---- output -----------------------------------------------------------------------------------

def _signed(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:+.3f}"


def _p(p: Optional[float]) -> str:
    return "—" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def quantity(declared: Declared) -> str:
    """What is tested: ``b − a`` or the interaction's difference of differences."""
    arms = f"{_arm(declared.b)} − {_arm(declared.a)}"
    if declared.across is None:
        return arms
    key, first, second = declared.across
    return f"({arms}) at {key}={first} − at {key}={second}"


def _arm(spec: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items())


def paper_cell(declared: Declared) -> str:
    """``0.888 → 0.939 (Δ +0.051; source)``, ``Δ −0.028 (source)`` or ``—``."""
    if declared.paper_delta is None:
        return "—"
    arms = "" if declared.paper_a is None else f"{declared.paper_a:.3f} → {declared.paper_b:.3f}, "
    source = f"; {declared.source}" if declared.source else ""
    return f"{arms}Δ {_signed(declared.paper_delta)}{source}"


def verdict_cell(tested: Tested) -> str:
    """The verdict, with the reason when it is inconclusive for want of seeds."""
    short = tested.effect.n < MIN_SEEDS
    return tested.verdict + (f" ({tested.effect.n} < {MIN_SEEDS} seeds)" if short else "")


def _ci(e: Effect) -> str:
    return f"{_signed(e.mean)} [{_signed(e.ci_low)}, {_signed(e.ci_high)}]"


def claims_markdown(rows: Sequence[Tested]) -> str:
    """The declared comparisons: quantity, the paper's claim and number, ours with its CI, the raw
    and Holm-adjusted p, the effect after every test step, its sign pattern, the verdict."""
    header = ["declared comparison", "tested quantity", "shared setting", "claim", "the paper", "seeds",
              "ours: mean [95% CI]", "test", "p", "p (Holm)", "positive", "per test step 0 / 1 / …",
              "across test steps", "verdict"]
    body = [[t.declared.name, quantity(t.declared), t.context, t.declared.claim
             + ("" if t.declared.margin is None else f" (margin {t.declared.margin:.3f})"),
             paper_cell(t.declared), str(t.effect.n), _ci(t.effect), t.effect.test, _p(t.effect.p), _p(t.p_holm),
             "—" if t.effect.positive is None else f"{t.effect.positive}/{t.effect.n}",
             " / ".join("—" if e is None else _signed(e.mean) for e in t.per_step) or "—",
             sign_pattern(t.per_step), f"**{verdict_cell(t)}**"] for t in rows]
    return table(header, body)


def effect_sizes_markdown(rows: Sequence[Tested]) -> str:
    """The paper's Δ next to ours (95 % CI), with n, the Holm-adjusted p and the verdict."""
    body = [[t.declared.name, t.context, paper_cell(t.declared), _ci(t.effect), str(t.effect.n), _p(t.p_holm),
             verdict_cell(t)] for t in rows]
    return table(["declared comparison", "shared setting", "the paper", "ours: Δ [95% CI]", "seeds", "p (Holm)",
                  "verdict"], body)


def claims_dict(rows: Sequence[Tested]) -> list[dict[str, Any]]:
    """The declared comparisons as JSON-ready data."""
    return [{**asdict(t), "quantity": quantity(t.declared), "across_test_steps": sign_pattern(t.per_step)}
            for t in rows]
