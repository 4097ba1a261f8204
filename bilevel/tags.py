"""The TensorBoard tag names of a run, defined once: the decomposition's summary, the trainer,
the evaluation, the panels (:mod:`bilevel.app.tb`, :mod:`bilevel.app.tb_layout`) and ``bilevel-report``
all spell them from here. What each tag means: :mod:`bilevel.app.tb_layout`.

Two spellings of the decomposition exist: :meth:`bilevel.decomposition.record.Decomposition.summary` keys
its scalars ``decomp/<term>/<stat>`` and ``decomp/check/<check>``; what is logged
(:func:`bilevel.app.tb_layout.present`) is ``terms/<term>/<stat>`` and ``checks/log10_<check>``.
An evaluation's tags are ``<prefix>/<name>`` for the prefixes :data:`EVAL` and :data:`TEST`
and their test-time-zeroing variants (:func:`zeroed`); ``metrics.json`` holds the final test's
tags with ``/`` written ``_`` (:func:`metric_key`).
"""
from __future__ import annotations

# --- the decomposition, as Decomposition.summary keys it
DECOMP_PREFIX = "decomp/"
NORM, COS_TOTAL, SHARE = "norm", "cos_total", "share"
"""The per-term statistics: ``‖term‖``, ``cos(term, total)`` and ``⟨term, total⟩ / ‖total‖²``."""
TOTAL = "total"
ENCODER_ADAPTATION = "encoder_adaptation"
IDENTITY, RECONSTRUCTION = "identity", "reconstruction"
"""The two checks: ‖Σ terms − meta-gradient‖ / ‖meta-gradient‖ and the eq. (1) logit error."""
CHECK_IDENTITY = f"{DECOMP_PREFIX}check/{IDENTITY}"
CHECK_RECONSTRUCTION = f"{DECOMP_PREFIX}check/{RECONSTRUCTION}"
PAIRS_SAME_CLASS = "pairs/same_class_weight"
PAIRS_DIFF_CLASS = "pairs/diff_class_weight"
COS_SAME_CLASS = "features/cos_same_class"
COS_DIFF_CLASS = "features/cos_diff_class"


def decomp(term: str, stat: str) -> str:
    """``decomp/<term>/<stat>``: a term's statistic as :meth:`~bilevel.decomposition.record.Decomposition.summary` keys it."""
    return f"{DECOMP_PREFIX}{term}/{stat}"


# --- the decomposition, as logged
TERMS_PREFIX = "terms/"
LOG10_PREFIX = "checks/log10_"
LOG10_IDENTITY = LOG10_PREFIX + IDENTITY
LOG10_RECONSTRUCTION = LOG10_PREFIX + RECONSTRUCTION
STRUCTURALLY_ZERO = f"{TERMS_PREFIX}structurally_zero"
"""The text panel naming the terms that are exactly zero under the run's configuration."""
PAIR_WEIGHTS_FIGURE = "pairs/weights"
CLASS_COSINE_FIGURE = "features/class_cosine"


def term(name: str, stat: str) -> str:
    """``terms/<name>/<stat>``: a term's statistic as logged."""
    return f"{TERMS_PREFIX}{name}/{stat}"


# --- training
TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
TRAIN_HEAD_NORM = "train/head_norm"
TRAIN_HEAD_ROW_SPREAD = "train/head_row_spread"
TRAIN_PARAMS_NORM = "train/params_norm"
TRAIN_STEP_SECONDS = "train/step_seconds"
RUN_EXECUTION = "run/execution"
"""The text panel saying which execution path the run takes and why."""

# --- evaluation
EVAL, TEST = "eval", "test"
"""The prefixes of the periodic evaluation and of the final test."""


def zeroed(prefix: str) -> str:
    """The prefix of the same evaluation with test-time zeroing: ``<prefix>_zeroed``."""
    return f"{prefix}_zeroed"


def accuracy(prefix: str) -> str:
    """The headline accuracy: ``<prefix>/accuracy``."""
    return f"{prefix}/accuracy"


def accuracy_low(prefix: str) -> str:
    """The lower end of the headline's 95 % confidence interval."""
    return f"{prefix}/accuracy_low"


def accuracy_high(prefix: str) -> str:
    """The upper end of the headline's 95 % confidence interval."""
    return f"{prefix}/accuracy_high"


def accuracy_step(prefix: str, step: int) -> str:
    """The accuracy after ``step`` test-time inner steps: ``<prefix>/accuracy_step_<step>``."""
    return f"{prefix}/accuracy_step_{step}"


def ci95_step(prefix: str, step: int) -> str:
    """The 95 % CI half-width after ``step`` test-time inner steps."""
    return f"{prefix}/ci95_step_{step}"


def tasks(prefix: str) -> str:
    """The number of tasks the evaluation averaged over."""
    return f"{prefix}/tasks"


# --- metrics.json
HEADLINE_STEP_METRIC = "test_headline_step"
"""The number of test-time inner steps the headline accuracy is taken after."""


def metric_key(tag: str) -> str:
    """The ``metrics.json`` key of a final test tag: ``test/accuracy`` → ``test_accuracy``."""
    return tag.replace("/", "_")
