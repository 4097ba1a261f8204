"""What an inner solver sees and returns: the plugin contract of an inner loop.

A solver gets the meta-parameters, one :class:`Support` value (the task's support labels, its
images or — when only the head adapts — its features, and the head to start from) and an
:class:`InnerConfig` (how many steps, which step size and momentum, the adapted set, the order);
it returns an :class:`InnerResult`. The engine's bases read an algorithm's inner loop from its
config's typed ``inner`` (:attr:`bilevel.algorithm.AlgorithmConfig.inner`), never from fields
looked up by name; evaluation and restarts hand the solver a copy with other ``steps`` and
``order`` (:meth:`InnerConfig.with_steps`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor

from bilevel.primitives.head import HeadState, init_head
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, Params

ADAPTED_SETS = ("all", "head")
ORDERS = ("second_order", "first_order")


@dataclass(frozen=True)
class InnerConfig:
    """An inner loop's settings: ``steps`` T (0: the starting state), step size ``lr`` α (None: a
    solver without one, e.g. a closed form), heavy-ball ``momentum`` μ (0: plain steps), the
    adapted set ``adapt`` (``all``: encoder and head; ``head``: the encoder is frozen) and
    ``order`` (``second_order`` differentiates through the inner gradients, ``first_order``
    holds them constant)."""

    steps: int = 1
    lr: Optional[float] = None
    momentum: float = 0.0
    adapt: str = "all"
    order: str = "second_order"

    def __post_init__(self) -> None:
        if self.adapt not in ADAPTED_SETS:
            raise ValueError(f"adapt must be one of {ADAPTED_SETS}, got {self.adapt!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.steps}")

    @property
    def first_order(self) -> bool:
        """Whether the inner gradients are held constant."""
        return self.order == "first_order"

    def with_steps(self, steps: int, first_order: Optional[bool] = None) -> "InnerConfig":
        """The same loop run for ``steps`` steps (first order when ``first_order``; None keeps the order)."""
        if first_order is None:
            return dataclasses.replace(self, steps=steps)
        return dataclasses.replace(self, steps=steps, order="first_order" if first_order else "second_order")


class Support(NamedTuple):
    """One task's support set as an inner solver sees it: the ``labels`` ``[..., n]``, the
    ``images`` (needed when the encoder adapts) or the ``features`` ``Φ`` ``[..., n, d]`` (given
    when only the head adapts; leading task dimensions on the shared path), and the ``head`` to
    start from (None: the solver's own initial head, by default the meta head)."""

    labels: Tensor
    images: Optional[Tensor] = None
    features: Optional[Tensor] = None
    head: Optional[HeadState] = None

    def encode(self, model: BilevelModel, encoder: Params) -> Tensor:
        """``Φ``: the given features, or the encoder's features of the images."""
        return self.features if self.features is not None else model.encode(encoder, self.images)

    def start(self, params: Params) -> HeadState:
        """The head to start from: :attr:`head`, or the meta head of ``params`` with an empty trace."""
        return self.head if self.head is not None else init_head(params[HEAD_WEIGHT], params[HEAD_BIAS])


class InnerResult(NamedTuple):
    """The adapted encoder (un-prefixed keys), the adapted head with its trace, and the
    encoder parameters each step's support features were computed with (``θ_0 … θ_{T-1}``)."""

    encoder: Params
    head: HeadState
    encoder_path: tuple[Params, ...]
