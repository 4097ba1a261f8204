"""The encoder's features and their VJP, as the inner solvers take them (engine tier: ``bilevel.engine``)."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.func import vjp

from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params
from bilevel.primitives.precision import loss_scales, unscale

_AUTOGRAD_PULLBACKS: ContextVar[bool] = ContextVar("bilevel_autograd_pullbacks", default=False)


@contextmanager
def autograd_pullbacks() -> Iterator[None]:
    """Within this block the inner solvers take the encoder's VJP with ``torch.autograd.grad``
    (``create_graph`` for second order) instead of ``torch.func.vjp``. For callers on plain
    autograd only (no ``torch.func`` transform around the solver): the per-task loop's plain
    step, where it saves the transforms' per-op wrapping (measured in docs/performance.md)."""
    token = _AUTOGRAD_PULLBACKS.set(True)
    try:
        yield
    finally:
        _AUTOGRAD_PULLBACKS.reset(token)


def encoder_pullback(
    model: BilevelModel, encoder: Params, x: Tensor, create_graph: bool
) -> tuple[Tensor, Callable[[Tensor], tuple[Params]]]:
    """``φ_θ(x)`` and its VJP ``c ↦ (J_θᵀ c,)``; ``create_graph`` keeps the VJP differentiable
    (it always is under ``torch.func``; see :func:`autograd_pullbacks`). Under an fp16 loss scale
    ``S`` the VJP is taken of ``S·c`` and divided by ``S``
    (:func:`~bilevel.primitives.precision.loss_scales`)."""
    if not _AUTOGRAD_PULLBACKS.get():
        features, pull = vjp(lambda e: model.encode(e, x), encoder)
    else:
        features = model.encode(encoder, x)

        def pull(cotangent: Tensor) -> tuple[Params]:
            grads = torch.autograd.grad(features, list(encoder.values()), cotangent, create_graph=create_graph)
            return (dict(zip(encoder, grads)),)

    scale, _ = loss_scales()
    if scale == 1.0:
        return features, pull
    return features, lambda cotangent: (unscale(pull(cotangent * scale)[0], scale),)
