"""``bilevel-report``'s figures of training curves (:mod:`bilevel.report.runs` reads the runs):
each term's share of the encoder meta-gradient and the same/different-class feature cosines per
setting, and the band drawer every curve figure uses (:mod:`bilevel.report.study_figures` too).

A curve of a setting is the mean over its runs at the steps every run logged
(:func:`common_curve`), drawn with a band: ± one sd over runs, the t-based 95 % CI of the mean,
or for a single run its own CI over evaluation tasks (:func:`task_bounds`). Each line has its own
colour and a legend; axes are labelled.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bilevel.report.runs import COS_DIFF, COS_SAME, SHARE_PREFIX, SHARE_SUFFIX, Group, RunRecord
from bilevel.report.stats import curve_band


def common_curve(runs: Sequence[RunRecord], tag: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(steps, values [runs, steps])`` of ``tag`` over the steps every run that logged it has."""
    curves = [r.scalars[tag] for r in runs if tag in r.scalars]
    if not curves:
        return None
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    if steps.size == 0:
        return None
    return steps, np.stack([v[np.searchsorted(s, steps)] for s, v in curves])


def task_bounds(runs: Sequence[RunRecord], tag: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """One run's own 95 % CI over its evaluation tasks at every step of ``tag`` (an accuracy whose
    ``_low``/``_high`` bounds were logged with it); None for several runs or without bounds."""
    if len(runs) != 1 or not {tag, f"{tag}_low", f"{tag}_high"} <= runs[0].scalars.keys():
        return None
    steps = runs[0].scalars[tag][0]
    low, high = (runs[0].scalars[f"{tag}_{end}"] for end in ("low", "high"))
    if not (np.array_equal(low[0], steps) and np.array_equal(high[0], steps)):
        return None
    return low[1], high[1]


def band(ax: Any, curve: Optional[tuple[np.ndarray, np.ndarray]], label: str, color: Any = None,
         ci: bool = False, bounds: Optional[tuple[np.ndarray, np.ndarray]] = None) -> None:
    """Draw the mean over runs of a :func:`common_curve` and a band: ± one sd over runs, or with
    ``ci`` the t-based 95 % CI of the mean (:func:`bilevel.report.stats.curve_band`), or the given
    ``bounds`` (one run's CI over tasks: :func:`task_bounds`). One run without bounds: no band."""
    if curve is None:
        return
    steps, values = curve
    if bounds is not None:
        mean, (low, high) = values.mean(0), bounds
    elif ci:
        mean, low, high = curve_band(values)
    else:
        mean = values.mean(0)
        sd = values.std(0, ddof=1) if values.shape[0] > 1 else np.zeros(len(steps))
        low, high = mean - sd, mean + sd
    (line,) = ax.plot(steps, mean, label=label, color=color, marker="." if len(steps) < 30 else None)
    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _panels(count: int, title: str) -> tuple[Figure, list[Any]]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes[:count])


def share_terms(runs: Sequence[RunRecord]) -> list[str]:
    """The decomposition terms whose ``terms/<term>/share`` was logged, sorted."""
    tags = {t for r in runs for t in r.scalars if t.startswith(SHARE_PREFIX) and t.endswith(SHARE_SUFFIX)}
    return sorted(t[len(SHARE_PREFIX):-len(SHARE_SUFFIX)] for t in tags)


def _label(ax: Any, title: str, ylabel: str) -> None:
    """A curve panel's title, axes labels (outer steps on x), grid and legend."""
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("outer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def shares_figure(groups: Sequence[Group]) -> Optional[Figure]:
    """Per setting, each term's share ``⟨term, total⟩ / ‖total‖²`` of the encoder meta-gradient."""
    with_terms = [(g, share_terms(g.runs)) for g in groups]
    with_terms = [(g, terms) for g, terms in with_terms if terms]
    if not with_terms:
        return None
    all_terms = sorted({t for _, terms in with_terms for t in terms})
    colors = {t: f"C{i % 10}" for i, t in enumerate(all_terms)}
    fig, axes = _panels(len(with_terms), "Decomposition: share of each term in the encoder meta-gradient")
    for ax, (group, terms) in zip(axes, with_terms):
        for term in terms:
            band(ax, common_curve(group.runs, f"{SHARE_PREFIX}{term}{SHARE_SUFFIX}"), term, colors[term])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        _label(ax, group.label, "share ⟨term, total⟩ / ‖total‖²")
    return fig


def cosine_figure(groups: Sequence[Group]) -> Optional[Figure]:
    """Per setting, mean feature cosine of same- vs different-class query–support pairs."""
    panels = [(g, common_curve(g.runs, COS_SAME), common_curve(g.runs, COS_DIFF)) for g in groups]
    panels = [p for p in panels if p[1] is not None or p[2] is not None]
    if not panels:
        return None
    fig, axes = _panels(len(panels), "Feature cosine similarity of query–support pairs (mean ± sd over seeds)")
    for ax, (group, same, diff) in zip(axes, panels):
        for curve, label, color in ((same, "same class", "C0"), (diff, "different class", "C3")):
            band(ax, curve, label, color)
        _label(ax, group.label, "cosine similarity")
    return fig


FIGURES = (
    ("decomposition_shares.png", shares_figure),
    ("feature_cosines.png", cosine_figure),
)


def write_figures(groups: Sequence[Group], out: Path, figures: Sequence[tuple[str, Any]] = FIGURES) -> list[Path]:
    """Write the ``figures`` (``(file name, builder)``) that have data; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    made = ((name, build(groups)) for name, build in figures)
    return [_save(fig, out / name) for name, fig in made if fig is not None]
