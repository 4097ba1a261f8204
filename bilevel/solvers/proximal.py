"""Proximal inner problems ``argmin_φ L_S(φ) + (λ/2)‖φ − φ_0‖²`` solved by gradient descent
(iMAML's solver; its hypergradient is implicit, :mod:`bilevel.hypergrad.implicit`)."""
from __future__ import annotations

from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params, tree_detach
from bilevel.solvers.sgd import sgd_steps
from bilevel.solvers.support import InnerConfig, InnerResult, Support


def proximal_solve(model: BilevelModel, params: Params, support: Support, inner: InnerConfig,
                   lam: float) -> InnerResult:
    """``inner.steps`` gradient-descent steps of size ``inner.lr`` on ``L_S(φ) + (λ/2)‖φ − φ_0‖²``
    from ``φ_0`` (:func:`~bilevel.solvers.sgd.sgd_steps` with ``prox=λ``, so the head trace is
    recorded). No graph is kept: the hypergradient is implicit."""
    return sgd_steps(model, tree_detach(params), support, inner.with_steps(inner.steps, first_order=True), prox=lam)
