"""Symmetric conjugate gradient over parameter dicts (for implicit hypergradients).

Solves ``M x = b`` for a symmetric operator ``M`` given as ``matvec`` (typically
``(1 + c) I + H/λ`` with ``H`` a Hessian-vector product from ``torch.func``), starting
from ``x_0 = 0``:

    r_0 = p_0 = b;   α_k = ⟨r_k, r_k⟩ / ⟨p_k, M p_k⟩;   x_{k+1} = x_k + α_k p_k
    r_{k+1} = r_k − α_k M p_k;   β_k = ⟨r_{k+1}, r_{k+1}⟩ / ⟨r_k, r_k⟩;   p_{k+1} = r_{k+1} + β_k p_k

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

from .params import Params, tree_add, tree_map, tree_vdot


class CGResult(NamedTuple):
    """The approximate solution and the recursive residual norms ``‖r_0‖ … ‖r_iters‖``
    (``[iters + 1]``; ``r_0 = b``)."""

    solution: Params
    residual_norms: Tensor


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
    norms = [rs.sqrt()]
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
    return CGResult(x, torch.stack(norms))
