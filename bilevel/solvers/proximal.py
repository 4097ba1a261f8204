"""Proximal inner problems ``argmin_φ L_S(φ) + (λ/2)‖φ − φ_0‖²`` solved by gradient descent
(iMAML's solver; its hypergradient is implicit, :mod:`bilevel.hypergrad.implicit`)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from bilevel.primitives.head import HeadState
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params, tree_detach
from bilevel.solvers.sgd import InnerResult, sgd_steps


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
    from ``φ_0`` (the engine's :func:`~bilevel.solvers.sgd.sgd_steps` with ``prox=λ``, so the
    head trace is recorded). No graph is kept: the hypergradient is implicit."""
    return sgd_steps(
        model, tree_detach(params), support_x, support_y, steps=steps, lr=lr, adapt=adapt,
        first_order=True, prox=lam, support_features=support_features, head=head,
    )
