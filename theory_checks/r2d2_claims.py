"""The R2-D2 claims of docs/theory.md §7 (10), measured on small float64 problems.

The reference is the *primal* ridge regression written with plain torch, independent of the
plugin's dual solve: ``[W, b]ᵀ = s ([Φ, 1]ᵀ[Φ, 1] + λI)⁻¹ [Φ, 1]ᵀ Y`` (a ``(d + 1) × (d + 1)``
system), and ``F.cross_entropy`` of the query logits for the meta-gradient (autograd through
``functional_call`` of the encoder). By the Woodbury identity it equals the plugin's
``W = AᵀΦ, b = Aᵀ1`` with ``A = s (ΦΦᵀ + 1 + λI)⁻¹ Y``; drop the ``+ λI`` from either and the two
part. Problem: an MLP encoder (6 → 8 → 8, ReLU), N = 3 ways, 2 shots, 2 queries, 2 tasks;
λ = 0.7, s = 2.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel import Support, build_algorithm
from bilevel.primitives.head import readout, reconstruct_logits
from bilevel.primitives.params import Params, encoder_part, is_head
from bilevel.testing import rel_err, seeded_problem

from .core import ClaimResult, check

LAM, SCALE, ROUNDOFF = 0.7, 2.5, 1e-10
ORDERS = ("second_order", "first_order")


def _problem(order: str):
    p = seeded_problem("mlp", ways=3, shots=2, queries=2, tasks=2, shape=(6,), seed=4)
    algo = build_algorithm({"name": "r2d2", "lam": LAM, "scale": SCALE, "order": order}, p.model)
    return p, algo


def primal_head(features: Tensor, labels: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of the primal ridge regression of one-hot ``labels`` on ``[Φ, 1]`` (module docstring)."""
    x = torch.cat([features, torch.ones_like(features[:, :1])], 1)
    y = F.one_hot(labels, ways).to(x.dtype)
    head = SCALE * torch.linalg.solve(x.T @ x + LAM * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return head[:-1].T, head[-1]


def primal_meta_grad(p, first_order: bool) -> Params:
    """Autograd of the mean query cross-entropy after the primal ridge head, w.r.t. the encoder."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.params.items() if not is_head(k)}
    encoder = encoder_part(leaves)
    losses = []
    for i in range(p.batch.support_y.shape[0]):
        phi_s = functional_call(p.model.encoder, encoder, (p.batch.support_x[i],))
        phi_q = functional_call(p.model.encoder, encoder, (p.batch.query_x[i],))
        weight, bias = primal_head(phi_s.detach() if first_order else phi_s, p.batch.support_y[i], p.ways)
        losses.append(F.cross_entropy(readout(phi_q, weight, bias), p.batch.query_y[i]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values()))
    return dict(zip(leaves, grads))


@check
def r2d2_closed_form_and_trace() -> list[ClaimResult]:
    """Claim 10: the ridge head is the primal closed form, and eq. (1)'s trace rebuilds its logits."""
    p, algo = _problem("second_order")
    rows = []
    head_err, trace_err = 0.0, 0.0
    for i in range(p.batch.support_y.shape[0]):
        support = Support(p.batch.support_y[i], images=p.batch.support_x[i])
        result = algo.inner_loop(p.params, support, algo.config.inner)
        feats = p.model.encode(encoder_part(p.params), p.batch.support_x[i])
        weight, bias = primal_head(feats, p.batch.support_y[i], p.ways)
        head_err = max(head_err, rel_err({"W": result.head.weight, "b": result.head.bias}, {"W": weight, "b": bias}))
        query = p.model.encode(result.encoder, p.batch.query_x[i])
        trace_err = max(trace_err, rel_err(reconstruct_logits(result.head.trace, query),
                                           readout(query, result.head.weight, result.head.bias)))
    rows.append(ClaimResult("10", f"R2-D2 λ={LAM} s={SCALE}: dual head (A = s(K+λI)⁻¹Y) vs the primal ridge solve "
                                  "‖[W,b] − primal‖/‖primal‖", head_err, ROUNDOFF))
    rows.append(ClaimResult("10", "R2-D2: eq. (1) trace logits vs the materialised head's (rel.)", trace_err, ROUNDOFF))
    return rows


@check
def r2d2_meta_gradient() -> list[ClaimResult]:
    """Claim 10: the meta-gradient equals autograd through the primal solve; the terms sum to it and
    ``init`` is exactly 0 (``W_0 = 0``)."""
    rows = []
    for order in ORDERS:
        p, algo = _problem(order)
        plain = algo.meta_grad(p.params, p.batch).grad
        reference = primal_meta_grad(p, first_order=order == "first_order")
        rows.append(ClaimResult("10", f"R2-D2 {order}: encoder meta-gradient vs autograd through the primal ridge "
                                      "head (rel.)", rel_err(plain, reference, keys=list(reference)), 1e-9))
        terms = algo.meta_grad(p.params, p.batch, decompose=True).decomposition.terms
        summed = {k: sum(t[k] for t in terms.values()) for k in reference}
        rows.append(ClaimResult("10", f"R2-D2 {order}: ‖Σ terms − d‖/‖d‖ ({', '.join(terms)})",
                                rel_err(summed, plain, keys=list(reference)), ROUNDOFF))
        if "init" in terms:
            init = max(float(t.abs().max()) for k, t in terms["init"].items() if k in reference)
            rows.append(ClaimResult("10", f"R2-D2 {order}: the init term is exactly 0 (W_0 = 0)", init, 0.0, "=="))
    return rows
