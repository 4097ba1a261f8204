"""``bilevel.report.stats``: seed summaries and paired tests, checked against formulas computed here.

The t quantiles are table values (two-sided 95 %: 4.303 for 2 dof, 2.776 for 4, 2.365 for 7);
the Wilcoxon p-values are counted by enumerating all 2^n sign assignments (the exact null
distribution), independent of scipy.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from scipy.stats import t as t_dist

from bilevel.report.stats import Stat, curve_band, format_p, holm, paired, t_quantile, welch

T_TABLE = {3: 4.303, 5: 2.776, 8: 2.365}


@pytest.mark.parametrize("n", sorted(T_TABLE))
def test_t_quantile_matches_the_table(n: int) -> None:
    assert t_quantile(n) == pytest.approx(T_TABLE[n], abs=1e-3)


def test_stat_mean_sd_and_t_interval() -> None:
    xs = [0.81, 0.77, 0.90, 0.85, 0.79]
    s = Stat.of(xs)
    mean = sum(xs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4)
    half = 2.776 * sd / math.sqrt(5)
    assert (s.n, s.mean, s.sd) == (5, pytest.approx(mean), pytest.approx(sd))
    assert s.ci_low == pytest.approx(mean - half, abs=1e-4) and s.ci_high == pytest.approx(mean + half, abs=1e-4)
    assert s.cell() == f"{mean:.3f} ± {sd:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def test_stat_skips_missing_values_and_has_no_interval_for_one() -> None:
    assert Stat.of([None, None]) is None
    one = Stat.of([0.5, None, float("nan")])
    assert (one.n, one.mean, one.sd, one.ci_low) == (1, 0.5, None, None) and one.cell() == "0.500"


def exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact signed-rank p-value by enumerating every sign pattern (no ties in |d|)."""
    d = d[d != 0]
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = ranks[d > 0].sum()
    total = ranks.sum()
    stats = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    extreme = min(observed, total - observed)
    count = sum(1 for w in stats if w <= extreme or w >= total - extreme)
    return count / len(stats)


def test_paired_comparison_against_hand_formulas() -> None:
    a = {0: 0.70, 1: 0.72, 2: 0.65, 3: 0.80, 4: 0.75, 5: 0.68, 6: 0.71, 9: 0.5}
    b = {0: 0.74, 1: 0.71, 2: 0.70, 3: 0.86, 4: 0.79, 5: 0.75, 6: 0.74, 7: 0.9}
    p = paired(a, b)
    seeds = (0, 1, 2, 3, 4, 5, 6)
    d = np.array([b[s] - a[s] for s in seeds])
    mean, sd = d.mean(), d.std(ddof=1)
    t = mean / (sd / math.sqrt(7))
    assert p.seeds == seeds and p.n == 7 and p.wins == 6 and p.ties == 0
    assert p.diff.mean == pytest.approx(mean) and p.diff.sd == pytest.approx(sd)
    assert p.t == pytest.approx(t)
    # two-sided p of t with 6 dof, by numerical integration of the t density (independent of scipy)
    xs = np.linspace(abs(t), 200, 2_000_001)
    density = math.gamma(3.5) / (math.sqrt(6 * math.pi) * math.gamma(3)) * (1 + xs ** 2 / 6) ** -3.5
    assert p.p_t == pytest.approx(2 * np.trapezoid(density, xs), abs=1e-4)
    assert p.p_wilcoxon == pytest.approx(exact_wilcoxon_p(d))
    assert p.diff.ci_low == pytest.approx(mean - 2.447 * sd / math.sqrt(7), abs=1e-4)


def test_five_seeds_all_one_way_give_the_smallest_wilcoxon_p() -> None:
    p = paired({s: 0.5 for s in range(5)}, {s: 0.5 + 0.01 * (s + 1) for s in range(5)})
    assert p.p_wilcoxon == pytest.approx(2 / 2 ** 5) and p.wins == 5


def test_degenerate_pairs() -> None:
    assert paired({0: 0.5}, {0: 0.6, 1: 0.7}) is None  # one common seed
    same = paired({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert (same.p_t, same.p_wilcoxon, same.ties, same.t) == (1.0, 1.0, 2, None)
    shifted = paired({0: 0.5, 1: 0.25, 2: 0.75}, {0: 0.625, 1: 0.375, 2: 0.875})
    assert shifted.p_t == 0.0 and shifted.diff.mean == 0.125


def test_format_p() -> None:
    assert (format_p(0.0312), format_p(0.0004), format_p(None)) == ("0.031", "<0.001", "—")


def test_curve_band_is_the_pointwise_t_interval() -> None:
    values = np.array([[0.1, 0.5], [0.3, 0.7], [0.2, 0.9]])
    mean, low, high = curve_band(values)
    half = 4.303 * values.std(0, ddof=1) / math.sqrt(3)
    np.testing.assert_allclose(mean, [0.2, 0.7])
    np.testing.assert_allclose(low, mean - half, atol=1e-3)
    np.testing.assert_allclose(high, mean + half, atol=1e-3)
    one_mean, one_low, _ = curve_band(values[:1])
    np.testing.assert_allclose(one_low, one_mean)


def test_holm_adjustment_by_hand() -> None:
    """m = 4 present p-values: sorted 0.01, 0.02, 0.03, 0.5 → 4·0.01, max(0.04, 3·0.02), max(0.06, 2·0.03), 0.5."""
    adjusted = holm([0.03, None, 0.01, 0.5, 0.02])
    assert adjusted[1] is None
    assert [adjusted[i] for i in (2, 4, 0, 3)] == pytest.approx([0.04, 0.06, 0.06, 0.5])
    assert holm([0.4, 0.9]) == pytest.approx([0.8, 0.9]) and holm([]) == []


def test_welch_against_the_satterthwaite_formulas() -> None:
    a, b = np.array([0.61, 0.64, 0.58, 0.70]), np.array([0.66, 0.71, 0.69, 0.75, 0.64, 0.73])
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 6
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 5)
    mean, se = b.mean() - a.mean(), math.sqrt(va + vb)
    result = welch(a, b)
    assert result.df == pytest.approx(df) and result.mean == pytest.approx(mean)
    assert result.p == pytest.approx(2 * t_dist.sf(mean / se, df))
    assert result.ci_high - mean == pytest.approx(t_dist.ppf(0.975, df) * se)
    assert welch([0.5], b) is None and welch([0.5, 0.5], [0.5, 0.5]) is None


def test_stat_cell_without_its_interval_and_with_a_task_interval() -> None:
    s = Stat.of([0.81, 0.77])
    assert s.cell(interval=False) == "0.790 ± 0.028"
    one = dataclasses.replace(Stat.of([0.5]), task_ci=0.04)
    assert one.cell() == "0.500 ± 0.040 †" and one.cell(digits=2) == "0.50 ± 0.04 †"
