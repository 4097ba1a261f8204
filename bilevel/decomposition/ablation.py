"""Ablation: train on a subset of the decomposition terms (docs/theory.md §3).

The encoder's update is the sum of the kept terms; the head (and any meta-parameter of the
algorithm's own, such as Meta-SGD's learning rates) always receives its exact meta-gradient
(docs/theory.md §3.4 — the head policy, not the ablation, controls the head). With
nothing kept out, the trainer uses the algorithm's plain meta-gradient, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bilevel.data.batch import TaskBatch
from bilevel.decomposition.step import MetaStep, Want
from bilevel.primitives.params import Params

if TYPE_CHECKING:
    from bilevel.algorithm import BilevelAlgorithm

CONTRASTIVE_SIDES = ("contrastive_query", "contrastive_support")


@dataclass(frozen=True)
class Ablation:
    """``kept`` terms form the encoder update; ``plain`` means no term is left out; ``terms``
    is the decomposition the run reports (the algorithm's, with the contrastive term split into
    its two sides when one of them is named)."""

    kept: tuple[str, ...]
    plain: bool
    terms: tuple[str, ...]

    def want(self, decompose: bool) -> Want:
        """What a step computes: the decomposition when ``decompose``, the kept terms' gradient
        unless the run is plain."""
        return Want(terms=self.terms if decompose else (), keep=None if self.plain else self.kept)

    def step(self, algorithm: BilevelAlgorithm, params: Params, batch: TaskBatch, decompose: bool) -> tuple[MetaStep, Params]:
        """The meta-step (with its decomposition when ``decompose``) and the gradient the outer
        optimiser follows: the plain meta-gradient, untouched, or the ablated one (the engine's
        cheaper exact path when no decomposition is asked for)."""
        result = algorithm.meta_step(params, batch, self.want(decompose))
        return result, result.grad


def resolve_ablation(keep: list[str] | None, drop: list[str], algorithm: BilevelAlgorithm) -> Ablation:
    """Check the requested terms against the algorithm's and build the :class:`Ablation`.

    Naming a side of the contrastive term (``contrastive_query`` / ``contrastive_support``)
    makes the algorithm compute the two sides instead of ``contrastive``. A term the
    algorithm does not have is an error that lists the terms it has.
    """
    keep_list = None if keep is None else list(keep)
    drop_list = list(drop)
    requested = (keep_list or []) + drop_list
    terms = list(algorithm.terms)
    if any(t in CONTRASTIVE_SIDES for t in requested):
        if "contrastive" not in terms or not algorithm.splits_contrastive:
            raise ValueError(
                f"algorithm {algorithm.name!r} cannot split its contrastive term into query and support "
                f"sides (terms: {', '.join(terms)}); its contrastive term may already be one-sided"
            )
        i = terms.index("contrastive")
        terms[i : i + 1] = list(CONTRASTIVE_SIDES)
    unknown = [t for t in requested if t not in terms]
    if unknown:
        raise ValueError(
            f"algorithm {algorithm.name!r} has no term(s) {unknown}; its decomposition terms are "
            f"{', '.join(terms)}"
        )
    kept = tuple(t for t in (keep_list if keep_list is not None else terms) if t not in drop_list)
    if not kept:
        raise ValueError(f"ablation keeps no term (keep={keep_list}, drop={drop_list}); keep at least one")
    return Ablation(kept=kept, plain=keep_list is None and not drop_list, terms=tuple(terms))
