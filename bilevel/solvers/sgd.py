"""Gradient descent on the support cross-entropy, built from the inner steps (:mod:`bilevel.solvers.steps`).

``sgd_steps`` runs ``T`` steps of (optionally proximal) gradient descent over the adapted set —
``"all"`` (encoder and head) or ``"head"`` (the encoder is frozen; ANIL) — with step size ``α``:

    θ_{t+1} = θ_t − α (∇_θ L_S(θ_t, W_t) + λ (θ_t − θ_0))          (adapt = "all")
    W_{t+1} = W_0 + (1 − αλ)(W_t − W_0) + A_tᵀ Φ_t,   A_t = −α ∂L_S/∂Z_S

With ``momentum = μ > 0`` both use heavy-ball momentum, ``v ← μ v + g``, ``x ← x − α v``;
for the head the velocity is kept in trace form (one coefficient block per entry, plus
the noise slot), so eq. (1) still holds: ``V_τ ← μ V_τ + λ A_τ`` (the proximal gradient of
entry τ), ``V_t = ∂L_S/∂Z_S`` for the new entry, and every ``A_τ ← A_τ − α V_τ``. The update rule
is the chain ``proximal(λ)``, ``momentum(μ)``, ``rate(α)`` (:func:`sgd`).

First order (``InnerConfig.order``) stops the gradient through the inner gradients (A_t, Φ_t in
the update and the encoder's inner gradient are constants); the fast weights stay
differentiable through the identity path. Tensors may carry leading task dimensions when
``adapt="head"`` (the shared-encoder path batches the head loops that way).
"""
from __future__ import annotations

from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params
from bilevel.solvers.steps import InnerStep, chain_steps, descend, momentum, proximal, rate
from bilevel.solvers.support import InnerConfig, InnerResult, Support


def sgd(inner: InnerConfig, prox: float = 0.0) -> InnerStep:
    """The update rule of gradient descent with step ``inner.lr``, heavy-ball ``inner.momentum``
    and a proximal pull ``prox`` (each step only when it is not 0)."""
    steps = ([proximal(prox)] if prox else []) + ([momentum(inner.momentum)] if inner.momentum else [])
    return chain_steps(*steps, rate(inner.lr))


def sgd_steps(model: BilevelModel, params: Params, support: Support, inner: InnerConfig,
              prox: float = 0.0) -> InnerResult:
    """``inner.steps`` steps of :func:`sgd` from ``params`` on ``support`` (module docstring):
    ``support.head`` overrides the initial head (e.g. task-broadcast copies); with
    ``adapt="head"`` the support features are computed once (or taken from ``support``)."""
    return descend(model, params, support, inner, sgd(inner, prox))
