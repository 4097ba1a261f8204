"""What the TensorBoard panels of a run are: tag names, one-sentence descriptions, the
custom-scalars layout that draws them like the paper's figures.

Tags (``docs/tutorial.md`` reads them), as the code names them; the lines of one chart are
written by nested runs under one tag (:func:`bilevel.tags.placement`: ``terms/contrastive/share``
is ``terms/share`` of the run ``term=contrastive``):

* ``train/`` loss and accuracy of the meta-batches (means since the last log), head and
  parameter norms, seconds per step; ``eval/``, ``test/`` (final) query accuracy after each
  test-time inner step (``accuracy_step_k``: ``accuracy_per_step`` of ``test_step=k``), the
  headline (``accuracy``) and its 95 % confidence bounds (``accuracy_low``/``accuracy_high``);
  ``*_zeroed/`` the same with test-time zeroing;
* ``terms/<term>/share|norm|cos_total`` of the encoder meta-gradient and ``terms/total/norm``
  (:meth:`bilevel.decomposition.record.Decomposition.summary`; shares and cosines rounded to
  :data:`ROUND_DIGITS` decimals, so that float round-off does not draw as swings);
* ``pairs/same_class_weight|diff_class_weight``, ``features/cos_same_class|cos_diff_class``
  (``pairs/weight``, ``features/cos`` of ``class=same|different``);
* ``checks/log10_identity``, ``checks/log10_reconstruction``: the two checks, as powers of ten
  (``checks/log10_error`` of ``check=identity|reconstruction``).

Values are logged at the step they belong to: the quantities of the ``n``-th outer step (its
loss, its decomposition and images) at ``n``, an evaluation after ``n`` steps at ``n``.
"""
from __future__ import annotations

import math
import re
from typing import Any

from bilevel import tags
from bilevel.tags import EVAL, TEST

ROUND_DIGITS = 4
CHECKS = {tags.CHECK_IDENTITY: tags.LOG10_IDENTITY, tags.CHECK_RECONSTRUCTION: tags.LOG10_RECONSTRUCTION}
TINY = 1e-30  # log10 of an exact zero is drawn at -30

_EVALS = f"({EVAL}|{TEST})"
_ANY_EVAL = _EVALS + "(_zeroed)?"  # an evaluation prefix, with or without test-time zeroing
_TERM = r"(\w+)"

DESCRIPTIONS: tuple[tuple[str, str], ...] = (
    (re.escape(tags.TRAIN_LOSS), "Mean query loss after adaptation over the meta-batches since the last point."),
    (re.escape(tags.TRAIN_ACCURACY),
     "Mean query accuracy after adaptation over the meta-batches since the last point."),
    (re.escape(tags.TRAIN_HEAD_NORM), "Norm of the linear head (W, b) after the outer update."),
    (re.escape(tags.TRAIN_HEAD_ROW_SPREAD),
     "Spread of the head's rows about their mean, sqrt(‖W − 1 w̄ᵀ‖² + ‖b − b̄‖²): the part of the head the "
     "softmax sees (0 for a zero head or equal rows; the initialisation interference needs it)."),
    (re.escape(tags.TRAIN_PARAMS_NORM), "Norm of all meta-parameters after the outer update."),
    (re.escape(tags.TRAIN_STEP_SECONDS), "Wall-clock seconds per outer step since the last point."),
    (re.escape(tags.TRAIN_LOSS_SCALE), "precision=fp16: the loss scale S after the step."),
    (re.escape(tags.TRAIN_SKIPPED_STEPS), "precision=fp16: outer steps skipped for a non-finite meta-gradient, so far."),
    (tags.tasks(_ANY_EVAL), "Number of held-out tasks this evaluation averaged over."),
    (tags.accuracy(_EVALS), "Headline: mean query accuracy over the held-out tasks after the headline number of "
                            "test-time inner steps (the number training uses), head as trained."),
    (tags.accuracy(tags.zeroed(_EVALS)),
     "Headline accuracy with test-time zeroing (head set to 0 before adaptation)."),
    (tags.accuracy(_ANY_EVAL) + "_(low|high)",
     "Lower/upper end of the 95 % confidence interval of the headline accuracy over the held-out tasks."),
    (tags.accuracy_step(_ANY_EVAL, r"(\d+)"),
     "Mean query accuracy over the held-out tasks after {2} test-time inner steps."),
    (re.escape(tags.term(tags.TOTAL, tags.NORM)), "Norm of the encoder meta-gradient (the sum of all terms)."),
    (re.escape(tags.term(tags.ENCODER_ADAPTATION, tags.NORM)),
     "Norm of the part of the feature terms that flows through the encoder's inner updates beyond the "
     "identity (a diagnostic, not a term)."),
    (tags.term(_TERM, tags.SHARE),
     "Share of the {0} term in the encoder meta-gradient, <term, total>/|total|^2 (the shares sum to 1)."),
    (tags.term(_TERM, tags.NORM), "Norm of the {0} term of the encoder meta-gradient."),
    (tags.term(_TERM, tags.COS_TOTAL), "Cosine between the {0} term and the whole encoder meta-gradient."),
    (re.escape(tags.PAIRS_SAME_CLASS),
     "Mean pair weight C[s,q] over same-class support-query pairs (negative: the pair attracts)."),
    (re.escape(tags.PAIRS_DIFF_CLASS),
     "Mean pair weight C[s,q] over different-class support-query pairs (positive: the pair repels)."),
    (re.escape(tags.COS_SAME_CLASS), "Mean cosine similarity of query and support features of the same class."),
    (re.escape(tags.COS_DIFF_CLASS), "Mean cosine similarity of query and support features of different classes."),
    (re.escape(tags.LOG10_IDENTITY),
     "log10 of |sum of terms - meta-gradient| / |meta-gradient|: round-off is below -5 in float32 and -10 in "
     "float64."),
    (re.escape(tags.LOG10_RECONSTRUCTION),
     "log10 of max |logits rebuilt from eq. (1) - logits|: round-off is below -5 in float32 and -10 in float64."),
)
"""(tag pattern, description) in matching order; ``{i}`` in a description is the pattern's
``i``-th group."""


def describe(tag: str) -> str:
    """The one-sentence description of ``tag`` ('' when it has none)."""
    for pattern, text in DESCRIPTIONS:
        match = re.fullmatch(pattern, tag)
        if match:
            return text.format(*match.groups())
    return ""


def present(summary: dict[str, float]) -> dict[str, float]:
    """The decomposition summary as logged: ``decomp/`` becomes ``terms/``, shares and cosines
    are rounded to :data:`ROUND_DIGITS` decimals, the checks become ``checks/log10_*``."""
    out: dict[str, float] = {}
    for tag, value in summary.items():
        if tag in CHECKS:
            out[CHECKS[tag]] = math.log10(max(abs(value), TINY))
        elif tag.startswith(tags.DECOMP_PREFIX):
            name = tags.TERMS_PREFIX + tag[len(tags.DECOMP_PREFIX):]
            out[name] = round(value, ROUND_DIGITS) if tag.endswith((f"/{tags.SHARE}", f"/{tags.COS_TOTAL}")) else value
        else:
            out[tag] = value
    return out


def term_of(tag: str) -> str | None:
    """The decomposition term a ``terms/<term>/...`` tag belongs to (None for other tags)."""
    parts = tag.split("/")
    return parts[1] if len(parts) == 3 and parts[0] + "/" == tags.TERMS_PREFIX else None


def _exactly(tag: str) -> str:
    """A regular expression matching exactly ``tag``."""
    return f"^{re.escape(tag)}$"


RAW = "raw values: smoothing 0"
"""Said in every category title: TensorBoard smooths lines by default (0.6); these values are
meant raw (``?smoothing=0`` in the address, or the slider; ``docs/tutorial.md``)."""


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The ``custom_scalars`` layout (categories in reading order; tags are regular expressions).
    A chart whose lines must be told apart draws one tag written by nested runs
    (:func:`bilevel.tags.placement`): each line has its own colour and is named in the run
    selector (``term=contrastive``, ``test_step=2``, ``check=identity``, ``class=same``).
    Accuracy per test step and the headline with its 95 % interval, all term shares on one
    chart and all term norms on another, same- vs different-class pair weights and cosines,
    and the two checks in powers of ten."""
    return {
        f"1. accuracy ({RAW})": {
            "eval: accuracy after each test-time inner step (one run per step: test_step=k)": [
                "Multiline", [_exactly(tags.per_step(EVAL))]],
            "eval: headline accuracy with its 95% interval": [
                "Margin", [tags.accuracy(EVAL), tags.accuracy_low(EVAL), tags.accuracy_high(EVAL)]],
            "eval with test-time zeroing: accuracy after each step (test_step=k)": [
                "Multiline", [_exactly(tags.per_step(tags.zeroed(EVAL)))]],
            "train: query loss": ["Multiline", [_exactly(tags.TRAIN_LOSS)]],
            "train: query accuracy": ["Multiline", [_exactly(tags.TRAIN_ACCURACY)]],
        },
        f"2. decomposition of the encoder meta-gradient ({RAW})": {
            "share of each term, sums to 1 (one run per term: term=<name>)": [
                "Multiline", [_exactly(tags.shared_term(tags.SHARE))]],
            "norm of each term and of the total (term=<name>)": ["Multiline", [_exactly(tags.shared_term(tags.NORM))]],
            "cosine of each term with the total (term=<name>)": [
                "Multiline", [_exactly(tags.shared_term(tags.COS_TOTAL))]],
        },
        f"3. contrastive structure ({RAW})": {
            "pair weights: class=same (attract, < 0) vs class=different (repel, > 0)": [
                "Multiline", [_exactly(tags.PAIR_WEIGHT)]],
            "feature cosine: class=same vs class=different": ["Multiline", [_exactly(tags.FEATURE_COS)]],
        },
        "4. checks (log10; round-off below -5 in float32)": {
            "identity (check=identity) and reconstruction (check=reconstruction) errors": [
                "Multiline", [_exactly(tags.SHARED_LOG10)]],
        },
    }
