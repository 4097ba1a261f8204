"""Inner solvers built from the head primitives, so every one of them leaves a trace.

``sgd_steps`` runs ``T`` steps of (optionally proximal) gradient descent on the support
cross-entropy over the adapted set — ``"all"`` (encoder and head) or ``"head"`` (the
encoder is frozen; ANIL) — with step size ``α``:

    θ_{t+1} = θ_t − α (∇_θ L_S(θ_t, W_t) + λ (θ_t − θ_0))          (adapt = "all")
    W_{t+1} = W_0 + (1 − αλ)(W_t − W_0) + A_tᵀ Φ_t,   A_t = −α ∂L_S/∂Z_S

With ``momentum = μ > 0`` both use heavy-ball momentum, ``v ← μ v + g``, ``x ← x − α v``;
for the head the velocity is kept in trace form (one coefficient block per entry, plus
the noise slot), so eq. (1) still holds: ``V_τ ← μ V_τ + λ A_τ`` (the proximal gradient of
entry τ), ``V_t = ∂L_S/∂Z_S`` for the new entry, and every ``A_τ ← A_τ − α V_τ``.

``first_order=True`` stops the gradient through the inner gradients (A_t, Φ_t in the
update and the encoder's inner gradient are constants); the fast weights stay
differentiable through the identity path. Tensors may carry leading task dimensions when
``adapt="head"`` (the shared-encoder path batches the head loops that way).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import vjp

from bilevel.primitives.head import HeadState, head_adjust, head_shrink, head_write, init_head, readout
from bilevel.primitives.losses import cross_entropy_logits_grad
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.precision import loss_scales, unscale
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, tree_detach

ADAPTED_SETS = ("all", "head")

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


class InnerResult(NamedTuple):
    """The adapted encoder (un-prefixed keys), the adapted head with its trace, and the
    encoder parameters each step's support features were computed with (``θ_0 … θ_{T-1}``)."""

    encoder: Params
    head: HeadState
    encoder_path: tuple[Params, ...]


def sgd_steps(
    model: BilevelModel,
    params: Params,
    support_x: Optional[Tensor],
    support_y: Tensor,
    *,
    steps: int,
    lr: float,
    adapt: str,
    first_order: bool,
    prox: float = 0.0,
    momentum: float = 0.0,
    support_features: Optional[Tensor] = None,
    head: Optional[HeadState] = None,
) -> InnerResult:
    """Run ``steps`` inner SGD steps from ``params`` (see the module docstring).

    With ``adapt="head"`` the support features are computed once (or taken from
    ``support_features``); ``head`` overrides the initial head (e.g. task-broadcast copies).
    """
    if adapt not in ADAPTED_SETS:
        raise ValueError(f"adapted set must be one of {ADAPTED_SETS}, got {adapt!r}")
    encoder = encoder_part(params)
    anchor = encoder
    state = head if head is not None else init_head(params[HEAD_WEIGHT], params[HEAD_BIAS])
    if adapt == "head" and support_features is None:
        support_features = model.encode(encoder, support_x)
    path: list[Params] = []
    head_velocity: tuple[Tensor, ...] = ()
    if momentum:
        enc_velocity = {k: torch.zeros_like(v) for k, v in encoder.items()}
        noise_velocity = (torch.zeros_like(state.weight), torch.zeros_like(state.bias))
    for _ in range(steps):
        path.append(encoder)
        if adapt == "all":
            feats, pull_back = encoder_pullback(model, encoder, support_x, create_graph=not first_order)
        else:
            feats = support_features
        logits_grad = cross_entropy_logits_grad(readout(feats, state.weight, state.bias), support_y)
        if adapt == "all":
            (enc_grad,) = pull_back(logits_grad @ state.weight)
            if first_order:
                enc_grad = tree_detach(enc_grad)
            if prox:
                enc_grad = {k: g + prox * (encoder[k] - anchor[k]) for k, g in enc_grad.items()}
            if momentum:
                enc_velocity = {k: momentum * enc_velocity[k] + g for k, g in enc_grad.items()}
                enc_grad = enc_velocity
            encoder = {k: v - lr * enc_grad[k] for k, v in encoder.items()}
        if first_order:
            logits_grad, feats = logits_grad.detach(), feats.detach()
        if momentum:
            t = state.trace
            head_velocity = tuple(momentum * v + prox * a for v, a in zip(head_velocity, t.coeffs))
            head_velocity += (logits_grad,)
            noise_velocity = (momentum * noise_velocity[0] + prox * t.noise_weight,
                              momentum * noise_velocity[1] + prox * t.noise_bias)
            state = head_write(state, feats, torch.zeros_like(logits_grad))
            state = head_adjust(state, tuple(-lr * v for v in head_velocity),
                                -lr * noise_velocity[0], -lr * noise_velocity[1])
            continue
        if prox:
            state = head_shrink(state, 1.0 - lr * prox)
        state = head_write(state, feats, -lr * logits_grad)
    return InnerResult(encoder, state, tuple(path))
