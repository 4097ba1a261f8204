"""The Meta-SGD claims of docs/theory.md §7 (11), measured on small float64 problems.

The reference is a literal Meta-SGD written with plain autograd, independent of the plugin:
``functional_call`` of the whole model, ``F.cross_entropy``, ``torch.autograd.grad``
(``create_graph`` at second order) and ``p ← p − α_p ⊙ ∇_p L_S`` on every parameter (``α_p`` the
encoder tensor's own rates; the head's scalar rate on ``head.weight`` and ``head.bias``). At
uniform rates the plugin must be MAML with that step (against the engine's MAML); at unequal
rates its gradient must match the reference's, and the rates' own gradient the reference's
central finite differences. Problem: an MLP encoder (6 → 8 → 8, ReLU), N = 3 ways, 2 shots,
2 queries, 2 tasks, 2 inner steps, rates around α = 0.4 (uniform: every rate α).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel import build_algorithm
from bilevel.primitives.params import ENCODER_PREFIX, Params, is_head
from bilevel.testing import rel_err, seeded_problem

from .core import ClaimResult, check

ALPHA, STEPS, ROUNDOFF, FD_STEP = 0.4, 2, 1e-10, 1e-5
ORDERS = ("second_order", "first_order")
RATE = "meta_sgd."


def _setup(order: str, uniform: bool):
    p = seeded_problem("mlp", ways=3, shots=2, queries=2, tasks=2, shape=(6,), seed=5)
    algo = build_algorithm({"name": "meta_sgd", "inner_lr": ALPHA, "inner_steps": STEPS, "order": order}, p.model)
    params = algo.meta_parameters(p.params)
    if not uniform:
        gen = torch.Generator().manual_seed(2)
        params = {k: v * (0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)) if k.startswith(RATE) else v
                  for k, v in params.items()}
    return p, algo, params


def _rate(params: Params, key: str) -> Tensor:
    return params[RATE + "lr_head"] if is_head(key) else params[RATE + "lr." + key[len(ENCODER_PREFIX):]]


def literal_meta_loss(p, params: Params, first_order: bool) -> Tensor:
    """The mean query loss after ``STEPS`` literal Meta-SGD steps (module docstring)."""
    net = [k for k in params if not k.startswith(RATE)]
    losses = []
    for i in range(p.batch.support_y.shape[0]):
        fast = {k: params[k] for k in net}
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(p.model, fast, (p.batch.support_x[i],)), p.batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - _rate(params, k) * g for (k, v), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(functional_call(p.model, fast, (p.batch.query_x[i],)), p.batch.query_y[i]))
    return torch.stack(losses).mean()


def literal_meta_grad(p, params: Params, first_order: bool) -> Params:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(literal_meta_loss(p, leaves, first_order), list(leaves.values()))
    return dict(zip(leaves, grads))


def literal_meta_loss_at(p, params: Params, direction: Params, step: float, first_order: bool) -> Tensor:
    """The literal meta-loss with the rates moved by ``step · direction`` (autograd inside, none outside)."""
    moved = {k: (v + step * direction[k] if k in direction else v).detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        return literal_meta_loss(p, moved, first_order).detach()


@check
def meta_sgd_uniform_rates_are_maml() -> list[ClaimResult]:
    """Claim 11: at uniform rates α, Meta-SGD's network meta-gradient is MAML's with step α."""
    rows = []
    for order in ORDERS:
        p, algo, params = _setup(order, uniform=True)
        maml = build_algorithm({"name": "maml", "inner_lr": ALPHA, "inner_steps": STEPS, "order": order,
                                "adapt": "all"}, p.model)
        reference = maml.meta_grad(p.params, p.batch).grad
        ours = algo.meta_grad(params, p.batch).grad
        rows.append(ClaimResult("11", f"Meta-SGD {order} T={STEPS}, every rate = {ALPHA}: network meta-gradient vs "
                                      "MAML's (rel.)", rel_err(ours, reference, keys=list(reference)), ROUNDOFF))
    return rows


@check
def meta_sgd_learned_rates() -> list[ClaimResult]:
    """Claim 11: at unequal rates, the meta-gradient (network and rates) equals the literal
    reference's; at second order (the exact derivative of the meta-loss) the rates' gradient also
    matches the central finite difference of the reference's meta-loss along a random direction."""
    rows = []
    for order in ORDERS:
        p, algo, params = _setup(order, uniform=False)
        first_order = order == "first_order"
        ours = algo.meta_grad(params, p.batch).grad
        reference = literal_meta_grad(p, params, first_order)
        rates = [k for k in params if k.startswith(RATE)]
        network = [k for k in params if not k.startswith(RATE)]
        rows.append(ClaimResult("11", f"Meta-SGD {order}, unequal rates: network meta-gradient vs the literal "
                                      "reference (rel.)", rel_err(ours, reference, keys=network), 1e-9))
        rows.append(ClaimResult("11", f"Meta-SGD {order}, unequal rates: the rates' gradient vs the literal "
                                      "reference (rel.)", rel_err(ours, reference, keys=rates), 1e-9))
        if first_order:
            continue
        gen = torch.Generator().manual_seed(3)
        direction = {k: torch.randn(params[k].shape, generator=gen, dtype=params[k].dtype) for k in rates}
        with torch.no_grad():
            shifted = [literal_meta_loss_at(p, params, direction, sign * FD_STEP, first_order) for sign in (1, -1)]
        finite = (shifted[0] - shifted[1]) / (2 * FD_STEP)
        analytic = sum((ours[k] * direction[k]).sum() for k in rates)
        rows.append(ClaimResult("11", f"Meta-SGD {order}: rates' directional derivative vs central finite difference "
                                      f"(h={FD_STEP:g}) of the literal meta-loss (rel.)",
                                float(abs(analytic - finite) / abs(finite)), 1e-6))
    return rows
