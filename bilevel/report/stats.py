"""Statistics over seeds: summaries with t-based 95 % intervals, and paired tests across arms.

**Over the seeds of one arm** (``n`` values ``x_1 … x_n``): the mean ``x̄``, the sample standard
deviation ``s = sqrt(Σ (x_i − x̄)² / (n − 1))`` and the 95 % confidence interval of the mean
``x̄ ± t_{0.975, n−1} · s / √n`` (Student's t; the seeds are the replicates, so the interval
speaks of the seed-to-seed variation, not of the test tasks'). One value has no sd and no
interval.

**Paired comparisons** of two arms that share seeds (same seed: same initialisation and the
same task sequence): the per-seed differences ``d_i = b_i − a_i``, their mean, sd and 95 %
interval as above, the paired t test (``t = d̄ / (s_d / √n)``, ``n − 1`` degrees of freedom,
two-sided; :func:`scipy.stats.ttest_rel`) and the Wilcoxon signed-rank test (two-sided, exact
for small ``n``, zero differences dropped; :func:`scipy.stats.wilcoxon`), and how many seeds
``b`` wins. With ``n = 5`` the smallest two-sided Wilcoxon p-value is ``2 / 2⁵ = 0.0625``: at
five seeds only the t test can reach 0.05, at eight seeds both can.

**Unpaired differences** (:func:`welch`): ``x̄_b − x̄_a`` with Welch's standard error
``sqrt(s_a²/n_a + s_b²/n_b)``, the Welch–Satterthwaite degrees of freedom
``(s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))``, a two-sided t test and
the t-based 95 % interval with those degrees of freedom.

**Multiplicity** (:func:`holm`): Holm's step-down adjustment of ``m`` p-values: sorted ascending
``p_(1) ≤ … ≤ p_(m)``, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``; rejecting where
``p̃ < α`` controls the family-wise error rate at ``α``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Stat:
    """Mean, sample sd and t-based 95 % CI of the mean over ``n`` seeds (sd, CI None for n = 1); for a
    final test accuracy of one seed, ``task_ci``: the half-width of the run's own 95 % CI over its
    test tasks (:func:`bilevel.report.tables.test_stat`)."""

    n: int
    mean: float
    sd: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    task_ci: Optional[float] = None

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> Optional["Stat"]:
        """The statistics of the values that are present (neither None nor NaN); None when none is."""
        xs = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
        if xs.size == 0:
            return None
        mean = float(xs.mean())
        if xs.size == 1:
            return cls(1, mean, None, None, None)
        sd = float(xs.std(ddof=1))
        half = t_quantile(xs.size) * sd / math.sqrt(xs.size)
        return cls(int(xs.size), mean, sd, mean - half, mean + half)

    def cell(self, digits: int = 3, interval: bool = True) -> str:
        """``0.912 ± 0.011 [0.898, 0.926]`` (mean ± sd [95 % CI]; without the CI unless ``interval``);
        for one seed the mean alone, or ``0.912 ± 0.013 †`` with its ``task_ci``."""
        mean = f"{self.mean:.{digits}f}"
        if self.sd is None:
            return mean if self.task_ci is None else f"{mean} ± {self.task_ci:.{digits}f} †"
        text = f"{mean} ± {self.sd:.{digits}f}"
        return f"{text} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]" if interval else text


def t_quantile(n: int, level: float = 0.95) -> float:
    """``t_{(1 + level)/2, n − 1}``: the two-sided ``level`` quantile of Student's t with ``n − 1`` dof."""
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    return float(sps.t.ppf((1 + level) / 2, n - 1))


@dataclass(frozen=True)
class Paired:
    """A paired comparison ``b − a`` over the ``n`` seeds both arms have (module docstring)."""

    n: int
    seeds: tuple[int, ...]
    diff: Stat
    t: Optional[float]
    p_t: Optional[float]
    p_wilcoxon: Optional[float]
    wins: int
    ties: int


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Optional[Paired]:
    """Compare ``b`` with ``a`` over their common seeds (dicts seed → value); None with fewer than 2.

    The t test of all-equal differences (sd 0, up to 1e-12) is undefined: its p-value is 1.0 when every
    difference is 0 and 0.0 otherwise (a constant non-zero shift). Wilcoxon with every
    difference 0 has p 1.0."""
    seeds = tuple(sorted(set(a) & set(b)))
    if len(seeds) < 2:
        return None
    xa = np.array([a[s] for s in seeds], dtype=np.float64)
    xb = np.array([b[s] for s in seeds], dtype=np.float64)
    d = xb - xa
    diff = Stat.of(d)
    assert diff is not None
    if diff.sd <= 1e-12:  # constant differences (up to round-off): t is undefined
        t, p_t = None, (1.0 if np.all(d == 0) else 0.0)
    else:
        result = sps.ttest_rel(xb, xa)
        t, p_t = float(result.statistic), float(result.pvalue)
    if np.all(d == 0):
        p_w: Optional[float] = 1.0
    else:
        p_w = float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return Paired(len(seeds), seeds, diff, t, p_t, p_w, int((d > 0).sum()), int((d == 0).sum()))


def format_p(p: Optional[float]) -> str:
    """``0.031``, ``<0.001``, or ``—``."""
    if p is None or math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def curve_band(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``values`` ``[seeds, points]``: mean and the t-based 95 % CI bounds
    (the mean itself for a single seed)."""
    x = np.asarray(values, dtype=np.float64)
    mean = x.mean(0)
    if x.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    half = t_quantile(x.shape[0]) * x.std(0, ddof=1) / math.sqrt(x.shape[0])
    return mean, mean - half, mean + half


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p-values (module docstring), in the input order; a missing p stays None and
    does not count towards ``m``."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p))
    m = len(present)
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass(frozen=True)
class Unpaired:
    """Welch's comparison ``b − a`` of two independent samples (module docstring)."""

    n_a: int
    n_b: int
    mean: float
    ci_low: float
    ci_high: float
    df: float
    p: float


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Unpaired]:
    """Welch's t test and interval of ``mean(b) − mean(a)``; None unless both have 2 values and
    the standard error is positive."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size < 2 or xb.size < 2:
        return None
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se <= 1e-12:
        return None
    df = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
    mean = float(xb.mean() - xa.mean())
    half = float(sps.t.ppf(0.975, df)) * se
    p = float(2 * sps.t.sf(abs(mean) / se, df))
    return Unpaired(int(xa.size), int(xb.size), mean, mean - half, mean + half, float(df), p)
