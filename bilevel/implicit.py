"""Proximal inner problems and their implicit hypergradients (docs/theory.md §5).

Inner problem over the adapted variables ``φ`` (``adapt="head"``: ``(W, b)``;
``adapt="all"``: every parameter), anchored at ``φ_0`` (the meta-parameters' copy of
``φ``) and depending on outer variables ``x`` (``head``: the encoder's features; ``all``:
none):

    φ*(x, φ_0) = argmin_φ  L_S(x, φ) + (λ/2)‖φ − φ_0‖²
    stationarity  F = ∇_φ L_S(x, φ*) + λ (φ* − φ_0) = 0

Implicit function theorem (H = ∇²_φ L_S at φ*, the *unregularised* support Hessian):

    dφ*/dφ_0 = λ (λI + H)^{-1},     dφ*/dx = −(λI + H)^{-1} ∂²L_S/∂φ∂x

so a cotangent ``φ̄`` on ``φ*`` maps to

    φ̄_0 = u,   x̄ = −(∂²L_S/∂x∂φ) u/λ,   with   (I + H/λ) u = φ̄          (paper's system)

``u`` is computed by conjugate gradient with Hessian-vector products of a linearisation
taken once (``torch.func.vjp`` of ``∇_φ L_S``, which also yields the mixed term). The
damped variant of the authors' code, ``((1 + c) I + H/(λ + e)) u = φ̄`` (and ``x̄`` with
``u/(λ + e)``), is available through ``damping = c`` and ``lam_offset = e``; both default
to 0 (the paper). The identity ``dW*/dp = dW_0 + d(A*ᵀΦ)`` used by the decomposition is
the linearised stationarity ``dF = 0``, so it holds for the undamped system at whatever
point ``φ*`` the solver returned, once CG has converged.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from torch import Tensor
from torch.func import grad, vjp
from torch.utils import _pytree as pytree

from .cg import conjugate_gradient
from .head import HeadState
from .inner import InnerResult, sgd_steps
from .models import BilevelModel
from .params import Params, tree_add, tree_detach, tree_map, tree_norm

SupportLoss = Callable[[Any, Params], Tensor]
"""``L_S(x, φ)``: the unregularised support loss of outer variables ``x`` and adapted ``φ``."""

Linearization = Callable[[Params], tuple[Any, Params]]
"""``w ↦ ((∂²L_S/∂x∂φ) w, H w)`` at the inner solution."""


class ImplicitVJP(NamedTuple):
    """Cotangents on the anchor ``φ_0`` and the outer variables ``x``, and the CG residual
    norms of the solve (``[cg_iters + 1]``)."""

    anchor: Params
    outer: Any
    residual_norms: Tensor


def proximal_solve(
    model: BilevelModel,
    params: Params,
    support_x: Optional[Tensor],
    support_y: Tensor,
    *,
    steps: int,
    lr: float,
    lam: float,
    adapt: str,
    support_features: Optional[Tensor] = None,
    head: Optional[HeadState] = None,
) -> InnerResult:
    """``steps`` gradient-descent steps of size ``lr`` on ``L_S(φ) + (λ/2)‖φ − φ_0‖²``
    from ``φ_0`` (the engine's :func:`~bilevel.inner.sgd_steps` with ``prox=λ``, so the
    head trace is recorded). No graph is kept: the hypergradient is implicit."""
    return sgd_steps(
        model, tree_detach(params), support_x, support_y, steps=steps, lr=lr, adapt=adapt,
        first_order=True, prox=lam, support_features=support_features, head=head,
    )


def linearize_stationarity(support_loss: SupportLoss, outer: Any, inner: Params) -> tuple[Params, Linearization]:
    """``∇_φ L_S(x, φ)`` at ``(outer, inner)`` and its linearisation ``w ↦ (x̄, H w)``
    (reverse-over-reverse; built once, reused by every CG iteration and right-hand side)."""
    return vjp(lambda x, phi: grad(support_loss, argnums=1)(x, phi), outer, inner)


def stationarity_residual(support_grad: Params, inner: Params, anchor: Params, lam: float) -> Tensor:
    """``‖∇_φ L_S(φ*) + λ (φ* − φ_0)‖`` (0 at the exact inner solution)."""
    return tree_norm({k: support_grad[k] + lam * (inner[k] - anchor[k]) for k in inner})


def implicit_vjp(
    linearization: Linearization,
    cotangent: Params,
    *,
    lam: float,
    cg_iters: int,
    damping: float = 0.0,
    lam_offset: float = 0.0,
) -> ImplicitVJP:
    """Map a cotangent on ``φ*`` to the anchor and the outer variables (module docstring)."""
    lam_h = lam + lam_offset

    def matvec(w: Params) -> Params:
        return tree_add(tree_map(lambda t: (1.0 + damping) * t, w), linearization(w)[1], 1.0 / lam_h)

    solved = conjugate_gradient(matvec, cotangent, cg_iters)
    mixed, _ = linearization(tree_map(lambda t: t / lam_h, solved.solution))
    outer = pytree.tree_map(lambda m: -m, mixed)
    return ImplicitVJP(solved.solution, outer, solved.residual_norms)
