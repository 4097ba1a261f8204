"""The TensorBoard tag names of a run, defined once: the decomposition's summary, the trainer,
the evaluation, the panels (:mod:`bilevel.app.tb.logger`, :mod:`bilevel.app.tb.layout`) and ``bilevel-report``
all spell them from here. What each tag means: :mod:`bilevel.app.tb.layout`.

Two spellings of the decomposition exist: :meth:`bilevel.decomposition.record.Decomposition.summary` keys
its scalars ``decomp/<term>/<stat>`` and ``decomp/check/<check>``; what is logged
(:func:`bilevel.app.tb.layout.present`) is ``terms/<term>/<stat>`` and ``checks/log10_<check>``.
An evaluation's tags are ``<prefix>/<name>`` for the prefixes :data:`EVAL` and :data:`TEST`
and their test-time-zeroing variants (:func:`zeroed`); ``metrics.json`` holds the final test's
tags with ``/`` written ``_`` (:func:`metric_key`).

A chart's lines that must be told apart are written as one tag by nested TensorBoard runs
(``tb/<run>/term=contrastive/`` writes ``terms/share``): :func:`placement` and :func:`logical`
map the tags above to where they are written and back.
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
TRAIN_LOSS_SCALE = "train/loss_scale"
TRAIN_SKIPPED_STEPS = "train/skipped_steps"
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


# --- where a tag is written: one TensorBoard run per line of a chart
# A chart whose lines must be told apart (the terms, the test steps, the two checks, same vs
# different class) draws one tag written by several runs nested in the run's folder,
# ``tb/<run>/<kind>=<value>/``: TensorBoard gives each its own colour and its name in the run
# selector. ``placement`` maps a tag above to (sub-run, tag as written); ``logical`` inverts it.
TERM_RUN, TEST_STEP_RUN, CHECK_RUN, CLASS_RUN = "term", "test_step", "check", "class"
SHARED_LOG10 = "checks/log10_error"
PAIR_WEIGHT, FEATURE_COS = "pairs/weight", "features/cos"
_CLASS_TAGS = {PAIRS_SAME_CLASS: ("same", PAIR_WEIGHT), PAIRS_DIFF_CLASS: ("different", PAIR_WEIGHT),
               COS_SAME_CLASS: ("same", FEATURE_COS), COS_DIFF_CLASS: ("different", FEATURE_COS)}
_CLASS_LOGICAL = {placed: tag for tag, placed in _CLASS_TAGS.items()}
_PER_STEP = (("accuracy_step_", "accuracy_per_step"), ("ci95_step_", "ci95_per_step"))


def shared_term(stat: str) -> str:
    """``terms/<stat>``: the tag every ``term=<name>`` run writes a term's statistic under."""
    return f"{TERMS_PREFIX}{stat}"


def per_step(prefix: str, what: str = "accuracy") -> str:
    """``<prefix>/accuracy_per_step`` (or ``ci95_per_step``): the tag every ``test_step=<k>`` run writes."""
    return f"{prefix}/{what}_per_step"


def sub_run(kind: str, value: object) -> str:
    """``<kind>=<value>``: the name of a nested run."""
    return f"{kind}={value}"


def placement(tag: str) -> tuple[str, str]:
    """``(sub-run, tag as written)``: ``terms/contrastive/share`` → ``("term=contrastive", "terms/share")``,
    ``eval/accuracy_step_2`` → ``("test_step=2", "eval/accuracy_per_step")``, ``checks/log10_identity`` →
    ``("check=identity", "checks/log10_error")``, ``pairs/same_class_weight`` → ``("class=same",
    "pairs/weight")``; any other tag stays in the run itself (sub-run ``""``)."""
    parts = tag.split("/")
    if len(parts) == 3 and parts[0] + "/" == TERMS_PREFIX:
        return sub_run(TERM_RUN, parts[1]), shared_term(parts[2])
    if tag.startswith(LOG10_PREFIX):
        return sub_run(CHECK_RUN, tag[len(LOG10_PREFIX):]), SHARED_LOG10
    if tag in _CLASS_TAGS:
        kind, placed = _CLASS_TAGS[tag]
        return sub_run(CLASS_RUN, kind), placed
    if len(parts) == 2:
        for stem, shared in _PER_STEP:
            if parts[1].startswith(stem) and parts[1][len(stem):].isdigit():
                return sub_run(TEST_STEP_RUN, parts[1][len(stem):]), f"{parts[0]}/{shared}"
    return "", tag


def logical(run: str, tag: str) -> str:
    """The tag above of ``tag`` as written in the nested run ``run`` (``""``: the run itself);
    the inverse of :func:`placement`."""
    kind, _, value = run.partition("=")
    if kind == TERM_RUN and tag.startswith(TERMS_PREFIX):
        return term(value, tag[len(TERMS_PREFIX):])
    if kind == CHECK_RUN and tag == SHARED_LOG10:
        return LOG10_PREFIX + value
    if kind == CLASS_RUN and (value, tag) in _CLASS_LOGICAL:
        return _CLASS_LOGICAL[(value, tag)]
    if kind == TEST_STEP_RUN:
        prefix, _, name = tag.partition("/")
        for stem, shared in _PER_STEP:
            if name == shared:
                return f"{prefix}/{stem}{value}"
    return tag
