"""The Entropy-SGD claims of docs/theory.md §7 (2 and 9), measured on small float64 problems.

References are independent of ``bilevel.hypergrad.chain``: the direction of the plain algorithm
(``meta_grad`` without decomposition, same noise) for the identity, and ``torch.autograd``
through ``functional_call`` of the whole model with ``F.cross_entropy`` for the SGD limit.
Problem: an MLP encoder (6 → 8 → 8, ReLU), N = 3 ways, 2 shots, 2 queries, 2 tasks, pooled
chain batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel import build_algorithm
from bilevel.data.batch import TaskBatch
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params
from bilevel.testing import rel_err, seeded_problem

from .core import ClaimResult, check

WAYS, SHOTS, QUERIES, TASKS, SHAPE = 3, 2, 2, 2, (6,)
ROUNDOFF = 1e-10


def _problem(seed: int) -> tuple[BilevelModel, Params, TaskBatch]:
    p = seeded_problem("mlp", ways=WAYS, shots=SHOTS, queries=QUERIES, tasks=TASKS, shape=SHAPE, seed=seed)
    return p.model, p.params, p.batch


def _config(**overrides) -> dict:
    cfg = {"name": "entropy_sgd", "inner_steps": 3, "inner_lr": 0.1, "gamma0": 2.0, "gamma1": 0.0,
           "noise": 0.05, "ema": 0.6, "batches": "pooled", "adapt": "all", "seed": 3}
    cfg.update(overrides)
    return cfg


@check
def entropy_sgd_identity() -> list[ClaimResult]:
    """Claim 2: the terms sum to the direction of the plain algorithm (same noise draws)."""
    model, params, batch = _problem(0)
    rows = []
    for adapt in ("all", "head"):
        algo = build_algorithm(_config(adapt=adapt), model)
        state = algo.state_dict()
        plain = algo.meta_grad(params, batch).grad
        algo.load_state_dict(state)
        terms = algo.meta_grad(params, batch, decompose=True).decomposition.terms
        summed = {k: sum(t[k] for t in terms.values()) for k in plain}
        rows.append(ClaimResult(
            "2", f"Entropy-SGD adapt={adapt} L=3 ε=0.05: ‖Σ terms − d_plain‖/‖d_plain‖ ({', '.join(terms)})",
            rel_err(summed, plain), ROUNDOFF,
        ))
    return rows


def _task_gradient(model: BilevelModel, params: Params, batch: TaskBatch) -> Params:
    """``(1/T) Σ_i ∇f_{B_i}(x)`` on the pooled batches, by autograd on the whole model."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = 0.0
    for i in range(TASKS):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        loss = loss + F.cross_entropy(functional_call(model, leaves, (x,)), y) / TASKS
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@check
def entropy_sgd_sgd_limit() -> list[ClaimResult]:
    """Claim 9. L = 1, ε = 0: the coupling never acts (x'_0 = x), so d = a η' γ ∇f_B(x) exactly
    for every γ: one plain SGD step of size η a η' γ. L = 3, ε = 0, η'γ = κ fixed, γ → ∞:
    d → Σ_k a (1 − a)^{L−k} (1 − (1 − κ)^k) ∇f_B(x) with an O(1/γ) error."""
    model, params, batch = _problem(1)
    grad = _task_gradient(model, params, batch)
    a, lr = 0.6, 0.1
    rows = []
    for gamma in (1.0, 1e6):
        algo = build_algorithm(_config(inner_steps=1, noise=0.0, gamma0=gamma, ema=a, inner_lr=lr), model)
        d = algo.meta_grad(params, batch).grad
        expected = {k: a * lr * gamma * g for k, g in grad.items()}
        rows.append(ClaimResult("9", f"L=1 ε=0 γ={gamma:g}: ‖d − a η' γ ∇f‖/‖a η' γ ∇f‖", rel_err(d, expected), 1e-12))
    kappa, steps = 0.5, 3
    c = sum(a * (1 - a) ** (steps - k) * (1 - (1 - kappa) ** k) for k in range(1, steps + 1))
    for gamma in (1e2, 1e5):
        algo = build_algorithm(
            _config(inner_steps=steps, noise=0.0, gamma0=gamma, inner_lr=kappa / gamma, ema=a), model
        )
        d = algo.meta_grad(params, batch).grad
        expected = {k: c * g for k, g in grad.items()}
        rows.append(ClaimResult(
            "9", f"L=3 ε=0 η'γ=0.5 γ={gamma:g}: ‖d − c ∇f‖/‖c ∇f‖ (O(1/γ))", rel_err(d, expected), 1.0 / gamma,
        ))
    return rows
