"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML whose inner learning rates are learned in the outer loop.

Inner loop, ``T`` steps over the whole network from ``(θ_0, W_0, b_0)``:

    θ_{t+1} = θ_t − α_θ ⊙ ∇_θ L_S(θ_t, W_t)                      (one rate per encoder element)
    W_{t+1} = W_t + A_tᵀ Φ_t,   b_{t+1} = b_t + A_tᵀ 1,   A_t = −α_h ∂L_S/∂Z_S    (one scalar α_h)

The head's rate is a scalar so that its update stays ``head_write(state, Φ_t, −α_h ∂L_S/∂Z_S)``:
the trace form of docs/theory.md §2 holds exactly, and the decomposition, the execution paths
(vmap, loop) and evaluation come from :class:`~bilevel.hypergrad.unrolled.UnrolledAlgorithm`, whose
SGD steps it keeps with one step changed: the fixed rate becomes ``learned_rates``. (A per-element
head rate would write ``(α_W ⊙ Gᵀ) Φ``, which is not of the form ``AᵀΦ``.)

The rates are meta-parameters beyond the network's: :meth:`MetaSGD.meta_parameters` adds
``meta_sgd.lr.<encoder key>`` (the shape of that encoder tensor) and ``meta_sgd.lr_head`` (a
scalar), both initialised to ``inner_lr``; the trainer optimises, checkpoints and shares them
with the network. They reach the meta-gradient through the nodes ``(φ_q, Φ_τ, A_τ)``, so the
decomposition's terms carry them too. ``second_order`` backpropagates through the inner
gradients; ``first_order`` holds them constant (the rates still get their gradient). With every
rate equal to α this is MAML with step α, exactly. Registered through the ``bilevel.algorithms``
entry point ``meta_sgd`` in ``pyproject.toml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bilevel import (
    ENCODER_PREFIX, HEAD_BIAS, INNER_LOOP, ORDERS, Check, InnerConfig, InnerStep, OneOf, Params, UnrolledAlgorithm,
    UnrolledConfig, learned_rates,
)

LR_PREFIX = "meta_sgd.lr."
LR_HEAD = "meta_sgd.lr_head"


@dataclass
class MetaSGDConfig(UnrolledConfig):
    """``inner_steps`` T, ``inner_lr`` (the initial value of every learned rate), ``order``.
    The inner loop adapts the whole network with plain (momentum-free) steps."""

    checks: ClassVar[dict[str, Check]] = {**INNER_LOOP, "order": OneOf(ORDERS), "adapt": OneOf(("all",)),
                                          "inner_momentum": OneOf((0.0,))}

    name: str = "meta_sgd"
    inner_steps: int = 1
    inner_lr: float = 0.4


def learning_rates(params: Params) -> tuple[Params, Tensor]:
    """The encoder's per-element rates (un-prefixed encoder keys) and the head's scalar rate."""
    if LR_HEAD not in params:
        raise KeyError(f"no {LR_HEAD!r} in the parameters: Meta-SGD runs on MetaSGD.meta_parameters(params)")
    n = len(LR_PREFIX)
    return {k[n:]: v for k, v in params.items() if k.startswith(LR_PREFIX)}, params[LR_HEAD]


class MetaSGD(UnrolledAlgorithm):
    """Meta-SGD over the whole network; see the module docstring."""

    Config = MetaSGDConfig

    def meta_parameters(self, params: Params) -> Params:
        """``params`` plus the rates, each ``inner_lr`` (encoder: per element; head: one scalar)."""
        lr = self.config.inner_lr
        rates = {LR_PREFIX + k[len(ENCODER_PREFIX):]: torch.full_like(v, lr)
                 for k, v in params.items() if k.startswith(ENCODER_PREFIX)}
        rates[LR_HEAD] = params[HEAD_BIAS].new_full((), lr)
        return {**params, **rates}

    def update_rule(self, inner: InnerConfig) -> InnerStep:
        """SGD steps whose rates are read from the meta-parameters the inner loop starts from."""
        return learned_rates(learning_rates)
