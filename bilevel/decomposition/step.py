"""The step protocol every hypergradient rule speaks: what a meta-step is asked for
(:class:`Want`: plain, ablated or decomposed), the typed per-task result it returns
(:class:`TaskResult`) and the meta-step the outer optimiser consumes (:class:`MetaStep`), built
only by :func:`bilevel.decomposition.assembly.assemble`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from torch import Tensor

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
