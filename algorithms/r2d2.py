"""R2-D2 (Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019): a closed-form ridge-regression head.

The inner problem is ridge regression of the one-hot support labels ``Y`` (``n × N``) on the
support features with a bias feature, ``[Φ, 1]``; in its dual (Woodbury) form, with the
engine's kernel ``K = ΦΦᵀ + 1`` (``k(s, q) = ⟨φ_s, φ_q⟩ + 1``, docs/theory.md §1),

    A = s (K + λI)⁻¹ Y,        W = W_0 + AᵀΦ,   b = b_0 + Aᵀ1,     W_0 = b_0 = 0

with ``s`` a fixed logit scale. That is eq. (1) of docs/theory.md §2 with one entry ``(Φ, A)``
and nothing else, so the trace is exact by construction and the decomposition, the execution
paths (vmap, loop, shared) and evaluation come from :class:`~bilevel.hypergrad.unrolled.UnrolledAlgorithm`.
The hypergradient is backprop through ``torch.linalg.solve`` (``second_order``), or with ``A`` and
``Φ`` held constant in the head (``first_order``: a one-sided contrastive learner).

``W_0 = 0``: the classic R2-D2 has no learned head. The meta head's values are not used (it
is multiplied by 0, which keeps it in the graph with an exact zero gradient), so the ``init``
term is exactly 0 and R2-D2 is a *pure* contrastive learner: its meta-gradient is the
``contrastive`` term (the query is pulled towards the support samples whose coefficient rows
favour its class) plus the ``coefficient`` path through ``(K + λI)⁻¹``.

Evaluation: step 0 is the meta head as it is (chance under ``head.policy=zeroing``); any step
count ``≥ 1`` is the ridge solution (a closed form has no intermediate steps), so the accuracy
is the same after every step from 1 on. ``test_steps`` defaults to 1. Not registered here:
the ``bilevel.algorithms`` entry point ``r2d2`` in ``pyproject.toml`` names this class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from bilevel import (
    ORDERS, POSITIVE, AlgorithmConfig, Check, InnerConfig, InnerResult, OneOf, Params, Support, UnrolledAlgorithm,
    encoder_part, head_write, init_head,
)


@dataclass
class R2D2Config(AlgorithmConfig):
    """``lam`` λ > 0 (ridge strength), ``scale`` s > 0 (fixed logit scale), ``order`` in
    {second_order, first_order}. The inner loop adapts the head only and is one solve."""

    checks: ClassVar[dict[str, Check]] = {"lam": POSITIVE, "scale": POSITIVE, "order": OneOf(ORDERS)}

    name: str = "r2d2"
    lam: float = 10.0
    scale: float = 10.0
    order: str = "second_order"
    test_steps: Optional[int] = 1

    @property
    def inner(self) -> InnerConfig:
        return InnerConfig(adapt="head", order=self.order)  # one solve of the head, no step size


def ridge_coefficients(features: Tensor, labels: Tensor, ways: int, lam: float) -> Tensor:
    """``A = (ΦΦᵀ + 1 + λI)⁻¹ Y`` for ``Φ`` ``[..., n, d]`` and labels ``[..., n]``: ``[..., n, N]``."""
    n = features.shape[-2]
    onehot = (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(features.dtype)
    eye = torch.eye(n, dtype=features.dtype, device=features.device)
    gram = features @ features.transpose(-1, -2) + 1.0 + lam * eye
    return torch.linalg.solve(gram, onehot)


class R2D2(UnrolledAlgorithm):
    """Closed-form ridge head on the support features; see the module docstring."""

    Config = R2D2Config

    def structural_zeros(self, head_policy: str) -> dict[str, str]:
        """``init`` always (``W_0 = 0``); at first order, what ``A`` and ``Φ`` held constant remove."""
        zeros = {"init": "the ridge head starts from W_0 = 0 under every head policy"}
        if self.first_order:
            zeros["coefficient"] = "first order: A is a constant"
            zeros["contrastive_support"] = "first order: the support features receive no gradient"
        return zeros

    def inner_loop(self, params: Params, support: Support, inner: InnerConfig) -> InnerResult:
        """One ridge solve (any ``inner.steps ≥ 1``); ``steps=0`` returns the starting head. The
        starting head only gives the shape (leading task dimensions on the shared path)."""
        encoder, start = encoder_part(params), support.start(params)
        if inner.steps == 0:
            return InnerResult(encoder, start, ())
        feats = support.encode(self.model, encoder)
        coeff = self.config.scale * ridge_coefficients(feats, support.labels, start.weight.shape[-2], self.config.lam)
        if inner.first_order:
            feats, coeff = feats.detach(), coeff.detach()
        state = init_head(0.0 * start.weight, 0.0 * start.bias)  # W_0 = b_0 = 0, in the graph (zero gradient)
        return InnerResult(encoder, head_write(state, feats, coeff), (encoder,))
