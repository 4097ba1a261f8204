"""BOIL (Oh, Yoo, Kim & Yun, ICLR 2021): MAML whose inner loop adapts the encoder only.

Inner loop, ``T`` steps from ``(θ_0, W_0, b_0)`` with the head frozen:

    θ_{t+1} = θ_t − α ∇_θ L_S(θ_t, W_0, b_0),        W = W_0,  b = b_0

The head is never written, so its trace has no entries and eq. (1) of docs/theory.md is
``z_q = W_0 φ_q + b_0``: the whole meta-gradient is the ``init`` term, carried to the encoder
through the inner steps (``head_frozen``: the engine reports the contrastive and coefficient
terms as exactly 0 and the decomposition as having no pair weights). From a zero head the
encoder's inner gradient ``(∂L_S/∂Z_S) W_0 dφ`` is 0 and nothing is learned, so BOIL declares
``head.policy=random`` as its default. An example plugin written from docs/plugins.md §9.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bilevel import (
    INNER_LOOP, ORDERS, Check, InnerConfig, InnerStep, OneOf, UnrolledAlgorithm, UnrolledConfig, chain_steps,
    frozen_head,
)


@dataclass
class BOILConfig(UnrolledConfig):
    """MAML's options (``inner_steps`` T, ``inner_lr`` α: the encoder's inner step, ``inner_momentum``,
    ``order``); the inner loop adapts the encoder, so the adapted set is ``all``."""

    checks: ClassVar[dict[str, Check]] = {**INNER_LOOP, "order": OneOf(ORDERS), "adapt": OneOf(("all",))}

    name: str = "boil"


class BOIL(UnrolledAlgorithm):
    """The encoder adapts in the inner loop, the head does not; see the module docstring."""

    Config = BOILConfig
    head_policy = "random"
    head_frozen = True

    def update_rule(self, inner: InnerConfig) -> InnerStep:
        """MAML's SGD steps with the head held where it starts (``support.head``, default the meta head)."""
        return chain_steps(frozen_head(), super().update_rule(inner))
