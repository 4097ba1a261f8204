"""Symmetric conjugate gradient over parameter dicts (for implicit hypergradients).

Solves ``M x = b`` for a symmetric operator ``M`` given as ``matvec`` (typically
``(1 + c) I + H/λ`` with ``H`` a Hessian-vector product from ``torch.func``), starting
from ``x_0 = 0``:

    r_0 = p_0 = b;   α_k = ⟨r_k, r_k⟩ / ⟨p_k, M p_k⟩;   x_{k+1} = x_k + α_k p_k
    r_{k+1} = r_k − α_k M p_k;   β_k = ⟨r_{k+1}, r_{k+1}⟩ / ⟨r_k, r_k⟩;   p_{k+1} = r_{k+1} + β_k p_k

The run records its step sizes ``α_k`` and ``β_k``. With them fixed, the same recurrence is a
linear map of the right-hand side, ``b ↦ P(M) b`` with ``P`` the run's polynomial
(:func:`cg_polynomial`): what a truncated solve does to *other* right-hand sides, exactly
additive over them (CG itself is not: its step sizes depend on ``b``).

Invariants: exactly ``iters`` iterations (no data-dependent control flow, no host sync),
so it runs under ``vmap`` (over tasks, over right-hand sides) and on any problem size,
a single scalar included. An iteration whose residual is already ``≤ tol`` (or exactly 0,
or whose curvature ``⟨p, M p⟩`` is 0) is frozen arithmetically with ``torch.where``:
``α = β = 0``, so a zero right-hand side gives ``x = 0`` and no ``0/0``. In exact
arithmetic CG solves an ``n``-dimensional SPD system in ``n`` iterations.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from bilevel.primitives.params import Params, tree_add, tree_map, tree_vdot


class CGResult(NamedTuple):
    """The approximate solution, the recursive residual norms ``‖r_0‖ … ‖r_iters‖``
    (``[iters + 1]``; ``r_0 = b``) and the step sizes ``α``, ``β`` (``[iters]`` each)."""

    solution: Params
    residual_norms: Tensor
    alphas: Tensor
    betas: Tensor


def _safe_ratio(num: Tensor, den: Tensor, active: Tensor) -> Tensor:
    """``num / den`` where ``active``, else 0 (without evaluating ``x / 0``)."""
    return torch.where(active, num / torch.where(active, den, torch.ones_like(den)), torch.zeros_like(num))


def conjugate_gradient(
    matvec: Callable[[Params], Params], rhs: Params, iters: int, tol: float = 0.0
) -> CGResult:
    """``iters`` CG iterations on ``matvec(x) = rhs`` (see the module docstring)."""
    if iters < 1:
        raise ValueError(f"conjugate gradient needs iters >= 1, got {iters}")
    if tol < 0:
        raise ValueError(f"conjugate gradient tolerance must be >= 0, got {tol}")
    x = tree_map(torch.zeros_like, rhs)
    r = dict(rhs)
    p = dict(rhs)
    rs = tree_vdot(r, r)
    norms, alphas, betas = [rs.sqrt()], [], []
    for _ in range(iters):
        mp = matvec(p)
        curvature = tree_vdot(p, mp)
        active = (rs > tol * tol) & (curvature != 0)
        alpha = _safe_ratio(rs, curvature, active)
        x = tree_add(x, p, alpha)
        r = tree_add(r, mp, -alpha)
        rs_next = tree_vdot(r, r)
        beta = _safe_ratio(rs_next, rs, active)
        p = tree_add(r, p, beta)
        rs = rs_next
        norms.append(rs.sqrt())
        alphas.append(alpha)
        betas.append(beta)
    return CGResult(x, torch.stack(norms), torch.stack(alphas), torch.stack(betas))


def cg_polynomial(matvec: Callable[[Params], Params], rhs: Params, alphas: Tensor, betas: Tensor) -> Params:
    """``P(M) rhs``: the CG recurrence with the recorded step sizes of a run (module docstring).
    On that run's own right-hand side it reproduces the run's solution; it is linear in ``rhs``."""
    x = tree_map(torch.zeros_like, rhs)
    r = dict(rhs)
    p = dict(rhs)
    for alpha, beta in zip(alphas, betas):
        mp = matvec(p)
        x = tree_add(x, p, alpha)
        r = tree_add(r, mp, -alpha)
        p = tree_add(r, p, beta)
    return x
