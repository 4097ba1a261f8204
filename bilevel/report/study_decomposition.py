"""A study's decomposition over training: per arm, each term's share of the encoder meta-gradient
and the same/different-class pair weights, each averaged over the steps a run logged them, then
over seeds; the head's norm and row spread at the end (the paper's second interference source).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from bilevel import tags
from bilevel.report.runs import Group, RunRecord
from bilevel.report.stats import Stat
from bilevel.report.study_claims import by_seed
from bilevel.report.tables import table

SHARE_TAG = re.compile(r"^terms/([^/]+)/share$")
PAIR_TAGS = ("pairs/same_class_weight", "pairs/diff_class_weight")
HEAD_NORM, HEAD_ROW_SPREAD = tags.TRAIN_HEAD_NORM, tags.TRAIN_HEAD_ROW_SPREAD


def mean_over_training(run: RunRecord, tag: str) -> Optional[float]:
    """The mean of ``tag`` over every step the run logged it (None when never logged)."""
    return float(run.scalars[tag][1].mean()) if tag in run.scalars else None


@dataclass
class DecompositionRow:
    """One arm: per decomposition term, its share ``⟨term, total⟩ / ‖total‖²`` of the encoder
    meta-gradient averaged over the logged steps of each run; the same/different-class pair
    weights averaged likewise (negative: the pairs attract); the head's norm and row spread
    (:func:`~bilevel.primitives.head.row_spread`) at the end."""

    label: str
    shares: dict[str, Optional[Stat]]
    pair_weights: dict[str, Optional[Stat]]
    head_norm_last: Optional[Stat]
    head_row_spread_last: Optional[Stat]


def decomposition_rows(groups: Sequence[Group]) -> list[DecompositionRow]:
    """A row per arm that logged a decomposition (statistics over seeds of per-run means)."""
    terms = sorted({m.group(1) for g in groups for r in g.runs for t in r.scalars if (m := SHARE_TAG.match(t))})
    rows = []
    for g in groups:
        if not any(SHARE_TAG.match(t) for r in g.runs for t in r.scalars):
            continue
        shares = {t: Stat.of(by_seed(g, lambda r, t=t: mean_over_training(r, f"terms/{t}/share")).values())
                  for t in terms}
        pairs = {tag.split("/")[1]: Stat.of(by_seed(g, lambda r, tag=tag: mean_over_training(r, tag)).values())
                 for tag in PAIR_TAGS}
        last = {tag: Stat.of(by_seed(g, lambda r, tag=tag: r.final(tag)).values())
                for tag in (HEAD_NORM, HEAD_ROW_SPREAD)}
        rows.append(DecompositionRow(g.label, shares, pairs, last[HEAD_NORM], last[HEAD_ROW_SPREAD]))
    return rows


def _sd_cell(stat: Optional[Stat]) -> str:
    if stat is None:
        return "—"
    return f"{stat.mean:+.3g}" if stat.sd is None else f"{stat.mean:+.3g} ± {stat.sd:.2g}"


def decomposition_markdown(rows: Sequence[DecompositionRow]) -> str:
    """Term shares, pair weights, head norm and row spread per arm (mean ± sd over seeds, 3 significant digits)."""
    terms = sorted({t for r in rows for t in r.shares})
    header = ["arm"] + [f"{t} share" for t in terms] + ["same-class pair weight", "diff-class pair weight",
                                                         "head norm (last)", "head row spread (last)"]
    body = [[r.label] + [_sd_cell(r.shares.get(t)) for t in terms]
            + [_sd_cell(r.pair_weights.get(k)) for k in ("same_class_weight", "diff_class_weight")]
            + [_sd_cell(r.head_norm_last), _sd_cell(r.head_row_spread_last)] for r in rows]
    return table(header, body)
