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
from typing import ClassVar, Optional

from torch import Tensor

from bilevel import (
    HEAD_BIAS, HEAD_WEIGHT, INNER_LOOP, ORDERS, AlgorithmConfig, Check, HeadState, InnerResult, OneOf, Params,
    UnrolledAlgorithm, cross_entropy_logits_grad, encoder_part, encoder_pullback, init_head, readout, tree_detach,
)


@dataclass
class BOILConfig(AlgorithmConfig):
    """``inner_steps`` T, ``inner_lr`` α (the encoder's inner step), ``order``."""

    checks: ClassVar[dict[str, Check]] = {**INNER_LOOP, "order": OneOf(ORDERS)}
    adapt: ClassVar[str] = "all"  # read by the unrolled base: the full-network path
    inner_momentum: ClassVar[float] = 0.0

    name: str = "boil"
    inner_steps: int = 1
    inner_lr: float = 0.4
    order: str = "second_order"


class BOIL(UnrolledAlgorithm):
    """The encoder adapts in the inner loop, the head does not; see the module docstring."""

    Config = BOILConfig
    head_policy = "random"
    head_frozen = True

    def inner_loop(
        self, params: Params, support_x, support_y: Tensor, support_features=None,
        head: Optional[HeadState] = None, steps: Optional[int] = None, first_order: Optional[bool] = None,
    ) -> InnerResult:
        """``steps`` (default ``inner_steps``) SGD steps on the encoder; the head stays ``head``
        (default the meta head)."""
        steps = self.config.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        state = head if head is not None else init_head(params[HEAD_WEIGHT], params[HEAD_BIAS])
        encoder, path = encoder_part(params), []
        for _ in range(steps):
            path.append(encoder)
            feats, pull_back = encoder_pullback(self.model, encoder, support_x, create_graph=not first_order)
            logits_grad = cross_entropy_logits_grad(readout(feats, state.weight, state.bias), support_y)
            (grad,) = pull_back(logits_grad @ state.weight)
            grad = tree_detach(grad) if first_order else grad
            encoder = {k: v - self.config.inner_lr * grad[k] for k, v in encoder.items()}
        return InnerResult(encoder, state, tuple(path))
