"""ProtoMAML (Triantafillou et al., ICLR 2020): MAML whose head starts from the support prototypes.

With ``c_k`` the mean support feature of class ``k`` (its prototype), the inner loop starts
from the head for which the logits are the prototypical network's, up to a per-query constant:

    W_0[k] = 2 c_k,    b_0[k] = −‖c_k‖²      (−‖φ − c_k‖² = 2 c_kᵀφ − ‖c_k‖² − ‖φ‖²)

and then takes MAML's ``T`` SGD steps on the whole network (encoder and head). ``W_0`` is a
function of the encoder, not the meta head: ``init`` is not 0 under ``head.policy=zeroing``
(its encoder part includes the path through the prototypes), so the plugin states its own
:meth:`structural_zeros`. The meta head is not read at all (it gets an exact zero gradient).
Evaluation comes with the base: step 0 is the prototype head (``steps=0``), each further step
continues from the last. An example plugin written from docs/plugins.md §10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bilevel import (
    Check, HeadState, InnerConfig, InnerResult, OneOf, Params, Support, UnrolledAlgorithm, UnrolledConfig, encoder_part,
    init_head,
)


def prototype_head(features: Tensor, labels: Tensor, ways: int) -> HeadState:
    """``W_0[k] = 2 c_k``, ``b_0[k] = −‖c_k‖²`` from features ``[..., n, d]`` and labels ``[..., n]``."""
    onehot = (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(features.dtype)
    prototypes = onehot.transpose(-1, -2) @ features / onehot.sum(-2).unsqueeze(-1)
    return init_head(2.0 * prototypes, -prototypes.pow(2).sum(-1))


@dataclass
class ProtoMAMLConfig(UnrolledConfig):
    """MAML's options (``inner_steps``, ``inner_lr``, ``inner_momentum``, ``order``); the inner
    loop adapts the whole network."""

    checks: ClassVar[dict[str, Check]] = {"adapt": OneOf(("all",))}  # the prototypes need the encoder's path
    name: str = "protomaml"


class ProtoMAML(UnrolledAlgorithm):
    """MAML from a prototype head; see the module docstring."""

    Config = ProtoMAMLConfig

    def structural_zeros(self, head_policy: str) -> dict[str, str]:
        """Only the first-order rules: ``W_0`` comes from the prototypes under every head policy, so
        neither ``init`` nor (after one step from ``W_0``) ``coefficient`` is 0 under zeroing."""
        if not self.first_order:
            return {}
        return {"coefficient": "first order: A is a constant",
                "contrastive_support": "first order: the support features receive no gradient"}

    def inner_loop(self, params: Params, support: Support, inner: InnerConfig) -> InnerResult:
        """MAML's SGD steps from ``support.head``, by default the prototype head of the support set."""
        if support.head is None:
            features = support.encode(self.model, encoder_part(params))
            support = support._replace(head=prototype_head(features, support.labels, self.model.ways))
        return super().inner_loop(params, support, inner)
