"""Head policies (docs/theory.md §4), orthogonal to the algorithm.

``random``: a random head drawn by the head init ``init`` (:data:`HEAD_INITS`): ``default``,
``nn.Linear``'s own (``W, b ~ U(−1/√d, 1/√d)``, sd ``1/√(3d)`` ≈ 0.072 for d = 64 features), or
``paper``, the authors' (the Kaiming-normal init of their MAML learner's linear layer:
``W ~ N(0, 2/d)``, sd ``√(2/d)`` ≈ 0.177 for d = 64, and ``b = 0``); ``scaled``: that init ×
``scale``; ``zero_init``: W = b = 0 once; ``zeroing`` (the zeroing trick): W = b = 0 before every
outer step — the outer optimiser still updates them, and they are re-zeroed. Test-time
zeroing evaluates a copy whose head is zeroed before adaptation. A run whose ``head.policy`` is
not set uses the one its algorithm declares (:func:`algorithm_policy`).
"""
from __future__ import annotations

import math

import torch

from bilevel.algorithm import BilevelAlgorithm, available_algorithms, get_algorithm
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, Params

HEAD_POLICIES = ("random", "scaled", "zero_init", "zeroing")
HEAD_INITS = ("default", "paper")


def algorithm_policy(name: str) -> str:
    """The head policy algorithm ``name`` declares (:attr:`bilevel.algorithm.BilevelAlgorithm.head_policy`),
    the default of ``head.policy``; ``zeroing`` for a name no plugin registers (whose error comes
    when the algorithm is built, with the list of algorithms)."""
    if name not in available_algorithms():
        return BilevelAlgorithm.head_policy
    return get_algorithm(name).head_policy


def check_policy(policy: str) -> None:
    """A clear error for an unknown policy name."""
    if policy not in HEAD_POLICIES:
        raise ValueError(f"unknown head policy {policy!r}; choose one of {', '.join(HEAD_POLICIES)}")


@torch.no_grad()
def initialise_head(params: Params, policy: str, scale: float, init: str = "default") -> None:
    """Apply the policy to freshly initialised parameters (in place); ``init`` redraws a random
    head (``random``, ``scaled``) as the module docstring says (``default``: left as drawn)."""
    check_policy(policy)
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r}; choose one of {', '.join(HEAD_INITS)}")
    if init == "paper" and policy in ("random", "scaled"):
        weight = params[HEAD_WEIGHT]
        weight.normal_(0.0, math.sqrt(2.0 / weight.shape[-1]))
        params[HEAD_BIAS].zero_()
    if policy == "scaled":
        params[HEAD_WEIGHT].mul_(scale)
        params[HEAD_BIAS].mul_(scale)
    elif policy in ("zero_init", "zeroing"):
        params[HEAD_WEIGHT].zero_()
        params[HEAD_BIAS].zero_()


@torch.no_grad()
def before_outer_step(params: Params, policy: str) -> None:
    """The zeroing trick: W = b = 0 before the meta-gradient is computed (in place)."""
    if policy == "zeroing":
        params[HEAD_WEIGHT].zero_()
        params[HEAD_BIAS].zero_()


def zeroed_head(params: Params) -> Params:
    """A copy of ``params`` whose head is zero (test-time zeroing); the encoder is shared."""
    out = dict(params)
    out[HEAD_WEIGHT] = torch.zeros_like(params[HEAD_WEIGHT])
    out[HEAD_BIAS] = torch.zeros_like(params[HEAD_BIAS])
    return out
