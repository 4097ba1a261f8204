"""A meta-step from its tasks: the reduction of a :class:`~bilevel.decomposition.step.TaskResult`
over tasks, and the one assembly of the :class:`~bilevel.decomposition.step.MetaStep` with its
:class:`~bilevel.decomposition.record.Decomposition` — no algorithm assembles one itself."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bilevel.data.batch import TaskBatch
from bilevel.decomposition.checks import identity_error
from bilevel.decomposition.cotangents import class_masks
from bilevel.decomposition.record import Decomposition
from bilevel.decomposition.reduction import MAX, MEAN, ROWS, reduce_fields
from bilevel.decomposition.step import MetaStep, TaskResult, Want


def mean_over_tasks(result: TaskResult) -> TaskResult:
    """Reduce a result stacked over tasks (leading axis) as its fields declare
    (``TaskResult.REDUCTION``): means of the losses, gradients, terms, adaptation and extras, the
    largest reconstruction error; pairs and cosines keep their task axis."""
    reducers = {MEAN: lambda t: t.mean(0), ROWS: lambda t: t, MAX: lambda t: t.amax()}
    return result._replace(**reduce_fields(result._asdict(), TaskResult.REDUCTION, reducers))


def assemble(result: TaskResult, batch: TaskBatch, want: Want, extras: Optional[dict[str, Tensor]] = None) -> MetaStep:
    """The :class:`~bilevel.algorithm.MetaStep` of a reduced result: the gradient the outer
    optimiser follows (plain, or ablated: the kept terms' sum on all but the head), and the
    :class:`~bilevel.decomposition.record.Decomposition` whose identity check compares the sum of the
    terms with the plain gradient."""
    grad = result.ablated if result.ablated is not None else result.grad
    decomposition = None
    if want.terms:
        terms = {t: {k: v[i] for k, v in result.terms.items()} for i, t in enumerate(want.terms)}
        same_class = class_masks(batch.support_y, batch.query_y)
        pairs, cosines, absent = _pair_diagnostics(result, same_class)
        decomposition = Decomposition(
            terms=terms,
            total=result.grad,
            pair_weights=pairs,
            feature_cosines=cosines,
            same_class=same_class,
            reconstruction_error=result.reconstruction,
            identity_error=identity_error(terms, result.grad),
            encoder_adaptation=result.adaptation,
            absent=absent,
        )
        if want.keep is not None:
            grad = decomposition.combine(want.keep)
    return MetaStep(grad, result.loss, result.accuracy, decomposition, {**result.extras, **(extras or {})})


NO_ENTRIES = "the inner loop never wrote the head (an empty trace): no support sample reaches the query logits"
"""Why a head-frozen inner loop's decomposition has no pair weights and no feature cosines."""


def _pair_diagnostics(result: TaskResult, same_class: Tensor) -> tuple[Tensor, Tensor, dict[str, str]]:
    """The pair weights and feature cosines of ``result``; where the trace had no entries, pair
    weights with 0 entries ``[tasks, 0, n_s, n_q]`` and NaN cosines, named in ``absent``."""
    absent: dict[str, str] = {}
    pairs, cosines = result.pairs, result.cosines
    if pairs is None:
        pairs = result.loss.new_zeros((*same_class.shape[:-2], 0, *same_class.shape[-2:]))
        absent["pair_weights"] = NO_ENTRIES
    if cosines is None:
        cosines = result.loss.new_full(same_class.shape, torch.nan)
        absent["feature_cosines"] = NO_ENTRIES
    return pairs, cosines, absent
