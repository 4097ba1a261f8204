"""A study's figures: validation curves with 95 % CI bands, and the paper's 5 × 11 cosine maps.

* ``learning_curves.png``: per arm, the validation accuracy (``eval/accuracy``, the headline
  step) against the outer step, the mean over seeds and its t-based 95 % CI band
  (:func:`bilevel.report.stats.curve_band`) over the steps every seed logged.
* ``cosine_heatmaps.png``: one row per arm with probes, one column per probe step; each panel
  is the ``ways × (2·ways + 1)`` map of :mod:`bilevel.app.cosine_protocol` — query class (rows)
  against support class (left block) and query class (right block), a blank column between —
  averaged over the arm's seeds (Kao et al., 2022, Fig. 3).
* ``forest.png``: one row per declared comparison (:mod:`bilevel.report.study_claims`): our effect
  and its 95 % CI over seeds, the paper's Δ as a diamond where it gives one, the verdict.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from bilevel.report.runs import EVAL_ACCURACY, Group
from bilevel.report.figures import band, common_curve, task_bounds
from bilevel.report.study import probe_steps, probed
from bilevel.report.study_claims import NOT_REPRODUCED, REPRODUCED, declared_results

VERDICT_COLORS = {REPRODUCED: "C2", NOT_REPRODUCED: "C3"}


def learning_curves_figure(groups: Sequence[Group]) -> Optional[Figure]:
    """Validation accuracy per arm: mean over seeds with its 95 % CI band."""
    curves = [(g.label, common_curve(g.runs, EVAL_ACCURACY), task_bounds(g.runs, EVAL_ACCURACY)) for g in groups]
    curves = [(label, c, bounds) for label, c, bounds in curves if c is not None]
    if not curves:
        return None
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    for i, (label, curve, bounds) in enumerate(curves):
        n = curve[1].shape[0]
        what = "1 seed, 95% CI over val tasks" if bounds is not None else f"n={n}"
        band(ax, curve, f"{label} ({what})", color=f"C{i % 10}", ci=True, bounds=bounds)
    ax.set_xlabel("outer step")
    ax.set_ylabel("validation accuracy (headline test step)")
    ax.set_title("Validation accuracy: mean over seeds with its 95% CI band (t); one seed: CI over tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return fig


def side_by_side(query_support: np.ndarray, query_query: np.ndarray) -> np.ndarray:
    """``[ways, 2·ways + 1]``: the query–support map, a NaN column, the query–query map."""
    ways = query_support.shape[0]
    return np.concatenate([query_support, np.full((ways, 1), np.nan), query_query], axis=1)


def mean_maps(by_seed: dict[int, dict[str, Any]], step: str) -> Optional[tuple[np.ndarray, int]]:
    """An arm's side-by-side map at ``step`` averaged over its seeds' probes, and the seed count."""
    maps = [side_by_side(np.asarray(p["steps"][step]["query_support"]), np.asarray(p["steps"][step]["query_query"]))
            for p in by_seed.values() if step in p["steps"]]
    return (np.mean(maps, axis=0), len(maps)) if maps else None


def cosine_heatmaps_figure(groups: Sequence[Group], steps: Optional[Sequence[str]] = None) -> Optional[Figure]:
    """The grid of averaged maps (arms × probe steps), one shared colour scale."""
    found = probed(groups)
    steps = list(steps) if steps is not None else probe_steps(found)
    if not found or not steps:
        return None
    cells = {(label, s): mean_maps(by_seed, s) for label, by_seed in found.items() for s in steps}
    values = np.concatenate([m[0][np.isfinite(m[0])] for m in cells.values() if m is not None])
    low, high = float(values.min()), float(values.max())
    fig = Figure(figsize=(3.4 * len(steps) + 1, 2.0 * len(found) + 0.8), layout="constrained")
    axes = fig.subplots(len(found), len(steps), squeeze=False)
    image = None
    for i, label in enumerate(found):
        for j, s in enumerate(steps):
            ax, cell = axes[i, j], cells[(label, s)]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.set_visible(False)
                continue
            matrix, n = cell
            image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high)
            ways = matrix.shape[0]
            ax.set_xticks([(ways - 1) / 2, ways + 1 + (ways - 1) / 2], ["support", "query"], fontsize="x-small")
            if j == 0:
                ax.set_ylabel(f"{label}\nquery class", fontsize="x-small")
            ax.set_title(f"{s} outer updates (n={n})", fontsize="small")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="cosine similarity")
    fig.suptitle("Feature cosine similarity of the meta-parameters on a fixed task: query vs support | query vs query")
    return fig


def forest_figure(groups: Sequence[Group]) -> Optional[Figure]:
    """The declared comparisons: ours (mean, 95 % CI; coloured by verdict) and the paper's Δ."""
    rows = declared_results(groups)
    if not rows:
        return None
    fig = Figure(figsize=(8, 1.0 + 0.55 * len(rows)), layout="constrained")
    ax = fig.subplots()
    for y, t in enumerate(reversed(rows)):
        e, color = t.effect, VERDICT_COLORS.get(t.verdict, "C7")
        ax.errorbar(e.mean, y, xerr=[[e.mean - e.ci_low], [e.ci_high - e.mean]], fmt="o", color=color, capsize=3,
                    label=t.verdict)
        if t.declared.paper_delta is not None:
            ax.plot(t.declared.paper_delta, y, "D", color="black", markerfacecolor="none", label="the paper's Δ")
    ax.set_yticks(range(len(rows)), [f"{t.declared.name}\n{t.context}" for t in reversed(rows)], fontsize="x-small")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("effect on the headline test accuracy (declared quantity; 95% CI over seeds)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize="x-small")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("Declared comparisons: ours vs the paper (verdicts Holm-adjusted)")
    return fig


STUDY_FIGURES = (
    ("forest.png", forest_figure),
    ("learning_curves.png", learning_curves_figure),
    ("cosine_heatmaps.png", cosine_heatmaps_figure),
)
