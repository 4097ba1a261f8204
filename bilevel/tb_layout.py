"""What the TensorBoard panels of a run are: tag names, one-sentence descriptions, the
custom-scalars layout that draws them like the paper's figures.

Tags (``docs/tutorial.md`` reads them):

* ``train/`` loss and accuracy of the meta-batches (means since the last log), head and
  parameter norms, seconds per step; ``eval/``, ``test/`` (final) query accuracy after each
  test-time inner step (``accuracy_step_k``), the headline (``accuracy``) and its 95 %
  confidence bounds (``accuracy_low``/``accuracy_high``); ``*_zeroed/`` the same with
  test-time zeroing;
* ``terms/<term>/share|norm|cos_total`` of the encoder meta-gradient and ``terms/total/norm``
  (:meth:`bilevel.decompose.Decomposition.summary`; shares and cosines rounded to
  :data:`ROUND_DIGITS` decimals, so that float round-off does not draw as swings);
* ``pairs/same_class_weight|diff_class_weight``, ``features/cos_same_class|cos_diff_class``;
* ``checks/log10_identity``, ``checks/log10_reconstruction``: the two checks, as powers of ten.
"""
from __future__ import annotations

import math
import re
from typing import Any

ROUND_DIGITS = 4
CHECKS = {"decomp/check/identity": "checks/log10_identity",
          "decomp/check/reconstruction": "checks/log10_reconstruction"}
TINY = 1e-30  # log10 of an exact zero is drawn at -30

DESCRIPTIONS: tuple[tuple[str, str], ...] = (
    (r"train/loss", "Mean query loss after adaptation over the meta-batches since the last point."),
    (r"train/accuracy", "Mean query accuracy after adaptation over the meta-batches since the last point."),
    (r"train/head_norm", "Norm of the linear head (W, b) after the outer update."),
    (r"train/params_norm", "Norm of all meta-parameters after the outer update."),
    (r"train/step_seconds", "Wall-clock seconds per outer step since the last point."),
    (r"(eval|test)(_zeroed)?/tasks", "Number of held-out tasks this evaluation averaged over."),
    (r"(eval|test)/accuracy", "Headline: mean query accuracy over the held-out tasks after the headline number of "
                              "test-time inner steps (the number training uses), head as trained."),
    (r"(eval|test)_zeroed/accuracy", "Headline accuracy with test-time zeroing (head set to 0 before adaptation)."),
    (r"(eval|test)(_zeroed)?/accuracy_(low|high)", "Lower/upper end of the 95 % confidence interval of the "
                                                   "headline accuracy over the held-out tasks."),
    (r"(eval|test)(_zeroed)?/accuracy_step_(\d+)", "Mean query accuracy over the held-out tasks after {2} "
                                                   "test-time inner steps."),
    (r"terms/total/norm", "Norm of the encoder meta-gradient (the sum of all terms)."),
    (r"terms/encoder_adaptation/norm", "Norm of the part of the feature terms that flows through the encoder's "
                                       "inner updates beyond the identity (a diagnostic, not a term)."),
    (r"terms/(\w+)/share", "Share of the {0} term in the encoder meta-gradient, <term, total>/|total|^2 "
                           "(the shares sum to 1)."),
    (r"terms/(\w+)/norm", "Norm of the {0} term of the encoder meta-gradient."),
    (r"terms/(\w+)/cos_total", "Cosine between the {0} term and the whole encoder meta-gradient."),
    (r"pairs/same_class_weight", "Mean pair weight C[s,q] over same-class support-query pairs (negative: the "
                                 "pair attracts)."),
    (r"pairs/diff_class_weight", "Mean pair weight C[s,q] over different-class support-query pairs (positive: the "
                                 "pair repels)."),
    (r"features/cos_same_class", "Mean cosine similarity of query and support features of the same class."),
    (r"features/cos_diff_class", "Mean cosine similarity of query and support features of different classes."),
    (r"checks/log10_identity", "log10 of |sum of terms - meta-gradient| / |meta-gradient|: round-off is below -5 "
                               "in float32 and -10 in float64."),
    (r"checks/log10_reconstruction", "log10 of max |logits rebuilt from eq. (1) - logits|: round-off is below -5 in "
                                     "float32 and -10 in float64."),
)


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
        elif tag.startswith("decomp/"):
            name = "terms/" + tag[len("decomp/"):]
            out[name] = round(value, ROUND_DIGITS) if tag.endswith(("/share", "/cos_total")) else value
        else:
            out[tag] = value
    return out


def term_of(tag: str) -> str | None:
    """The decomposition term a ``terms/<term>/...`` tag belongs to (None for other tags)."""
    parts = tag.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "terms" else None


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The ``custom_scalars`` layout (categories in reading order; tags are regular expressions):
    accuracy per test step and the headline with its 95 % interval, all term shares on one
    chart and all term norms on another, same- vs different-class pair weights and cosines,
    and the two checks in powers of ten."""
    return {
        "1. accuracy": {
            "eval: accuracy after each test-time inner step": ["Multiline", [r"eval/accuracy_step_\d+"]],
            "eval: headline accuracy with its 95% interval": [
                "Margin", ["eval/accuracy", "eval/accuracy_low", "eval/accuracy_high"]],
            "eval with test-time zeroing: accuracy after each step": [
                "Multiline", [r"eval_zeroed/accuracy_step_\d+"]],
            "train: query loss and accuracy": ["Multiline", [r"train/(loss|accuracy)$"]],
        },
        "2. decomposition of the encoder meta-gradient": {
            "share of each term (sums to 1)": ["Multiline", [r"terms/\w+/share"]],
            "norm of each term": ["Multiline", [r"terms/\w+/norm"]],
        },
        "3. contrastive structure": {
            "pair weights: same class (attract, < 0) vs different class (repel, > 0)": [
                "Multiline", [r"pairs/(same|diff)_class_weight"]],
            "feature cosine: same vs different class": ["Multiline", [r"features/cos_(same|diff)_class"]],
        },
        "4. checks (log10; round-off below -5 in float32)": {
            "identity and reconstruction errors": ["Multiline", [r"checks/log10_\w+"]],
        },
    }
