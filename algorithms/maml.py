"""MAML (Finn et al., 2017) as a composition of engine pieces (docs/theory.md §4).

Inner loop: ``inner_steps`` SGD steps of size ``inner_lr`` on the support cross-entropy
over the adapted set (``all``, or ``head`` = ANIL). Hypergradient: backprop through the
unrolled steps (``second_order``) or with the inner gradients detached
(``first_order``). Only the query loss after the last step enters the meta-loss, averaged
over the tasks. Presets: ``algorithm=fomaml`` (first order), ``algorithm=anil`` (head only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bilevel import INNER_LOOP, Check, Range, UnrolledAlgorithm, UnrolledConfig


@dataclass
class MAMLConfig(UnrolledConfig):
    checks: ClassVar[dict[str, Check]] = {**INNER_LOOP, "inner_momentum": Range(low=0, high=1, high_open=True)}

    name: str = "maml"


class MAML(UnrolledAlgorithm):
    """Second- or first-order MAML; the engine's unrolled hypergradient, unchanged."""

    Config = MAMLConfig
