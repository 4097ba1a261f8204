"""A meta-step from its tasks: the reduction of a :class:`~bilevel.decomposition.step.TaskResult`
over tasks, and the one assembly of the :class:`~bilevel.decomposition.step.MetaStep` with its
:class:`~bilevel.decomposition.record.Decomposition` — no algorithm assembles one itself."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from bilevel.data.batch import TaskBatch
from bilevel.decomposition.checks import identity_error
from bilevel.decomposition.cotangents import class_masks
from bilevel.decomposition.record import Decomposition
from bilevel.decomposition.step import MetaStep, TaskResult, Want
from bilevel.primitives.params import Params


def mean_over_tasks(result: TaskResult) -> TaskResult:
    """Reduce a result stacked over tasks (leading axis): means of the losses, gradients, terms,
    adaptation and extras, the largest reconstruction error; pairs and cosines keep their task axis."""

    def mean(tree: Optional[Params]) -> Optional[Params]:
        return None if tree is None else {k: v.mean(0) for k, v in tree.items()}

    return result._replace(
        loss=result.loss.mean(0),
        accuracy=result.accuracy.mean(0),
        grad=mean(result.grad),
        ablated=mean(result.ablated),
        terms=mean(result.terms),
        reconstruction=None if result.reconstruction is None else result.reconstruction.amax(),
        adaptation=mean(result.adaptation),
        extras=mean(result.extras),
    )


def assemble(result: TaskResult, batch: TaskBatch, want: Want, extras: Optional[dict[str, Tensor]] = None) -> MetaStep:
    """The :class:`~bilevel.algorithm.MetaStep` of a reduced result: the gradient the outer
    optimiser follows (plain, or ablated: the kept terms' sum on all but the head), and the
    :class:`~bilevel.decomposition.cotangents.Decomposition` whose identity check compares the sum of the
    terms with the plain gradient."""
    grad = result.ablated if result.ablated is not None else result.grad
    decomposition = None
    if want.terms:
        terms = {t: {k: v[i] for k, v in result.terms.items()} for i, t in enumerate(want.terms)}
        decomposition = Decomposition(
            terms=terms,
            total=result.grad,
            pair_weights=result.pairs,
            feature_cosines=result.cosines,
            same_class=class_masks(batch.support_y, batch.query_y),
            reconstruction_error=result.reconstruction,
            identity_error=identity_error(terms, result.grad),
            encoder_adaptation=result.adaptation,
        )
        if want.keep is not None:
            grad = decomposition.combine(want.keep)
    return MetaStep(grad, result.loss, result.accuracy, decomposition, {**result.extras, **(extras or {})})
