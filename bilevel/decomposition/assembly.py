"""A meta-step from its tasks: the typed per-task result every hypergradient rule returns, what a
step is asked for (:class:`Want`: plain, ablated or decomposed), the reduction over tasks, and the
one assembly of the :class:`MetaStep` with its :class:`~bilevel.decomposition.record.Decomposition`
— no algorithm assembles one itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from torch import Tensor

from bilevel.data.batch import TaskBatch
from bilevel.decomposition.checks import identity_error
from bilevel.decomposition.cotangents import class_masks
from bilevel.decomposition.record import Decomposition
from bilevel.primitives.params import Params


@dataclass
class MetaStep:
    """One meta-batch: the meta-gradient (mean over tasks), the mean query loss and accuracy
    after adaptation, the decomposition when requested, and algorithm-specific scalars."""

    grad: Params
    loss: Tensor
    accuracy: Tensor
    decomposition: Optional[Decomposition] = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class Want(NamedTuple):
    """What a meta-step computes: the decomposition into ``terms`` (empty: none) and the
    ablated gradient that keeps ``keep`` (None: the plain meta-gradient is followed)."""

    terms: tuple[str, ...] = ()
    keep: Optional[tuple[str, ...]] = None


class TaskResult(NamedTuple):
    """One task's (or one shared batch's) hypergradient and what was asked of it.

    ``grad`` is the plain meta-gradient (None when a decomposing ``loop`` step takes it from a
    plain step, :func:`~bilevel.execution.mapping.map_meta_steps`); ``ablated`` the gradient of
    ``Want.keep`` when no decomposition was asked; ``terms`` the term gradients stacked
    ``{key: [len(Want.terms), *shape]}``; ``pairs`` ``[entries, n_s, n_q]`` and ``cosines``
    ``[n_s, n_q]`` per task; ``reconstruction`` the eq. (1) error; ``adaptation`` the
    encoder-adaptation diagnostic; ``extras`` per-task scalars (averaged over tasks)."""

    loss: Tensor
    accuracy: Tensor
    grad: Optional[Params] = None
    ablated: Optional[Params] = None
    terms: Optional[Params] = None
    pairs: Optional[Tensor] = None
    cosines: Optional[Tensor] = None
    reconstruction: Optional[Tensor] = None
    adaptation: Optional[Params] = None
    extras: dict[str, Tensor] = {}


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
