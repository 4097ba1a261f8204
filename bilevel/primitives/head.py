"""The linear head as a record of what the support samples wrote into it (docs/theory.md §2).

Every inner update of the head is expressed through features and coefficient rows, so
the adapted head is, exactly,

    W = W_0 + Σ_τ A_τᵀ Φ_τ + ξ_W,        b = b_0 + Σ_τ A_τᵀ 1 + ξ_b          (eq. 1)

with ``Φ_τ ∈ R^{n_τ×d}`` the features an update used and ``A_τ ∈ R^{n_τ×N}`` the rows each
sample wrote. The primitives below keep the materialised ``(W, b)`` (what the algorithm
uses) and the :class:`HeadTrace` (what the decomposition reads) in step, so any inner
loop built from them is decomposable. All functions accept any number of leading batch
dimensions (tasks), so the same code serves one task, a ``vmap`` and a batched loop.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class HeadTrace(NamedTuple):
    """``(W_0, b_0)``, the ``(Φ_τ, A_τ)`` entries and the additive noise ``(ξ_W, ξ_b)``."""

    weight0: Tensor
    bias0: Tensor
    features: tuple[Tensor, ...]
    coeffs: tuple[Tensor, ...]
    noise_weight: Tensor
    noise_bias: Tensor


class HeadState(NamedTuple):
    """The materialised head and the trace that explains it."""

    weight: Tensor
    bias: Tensor
    trace: HeadTrace


def init_head(weight0: Tensor, bias0: Tensor) -> HeadState:
    """A head that has not been adapted yet: ``W = W_0``, ``b = b_0``, empty trace."""
    trace = HeadTrace(
        weight0, bias0, (), (), torch.zeros_like(weight0), torch.zeros_like(bias0)
    )
    return HeadState(weight0, bias0, trace)


def readout(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Logits ``z = φ Wᵀ + b``: ``[..., n, d] × [..., N, d] → [..., n, N]``."""
    return features @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def row_spread(weight: Tensor, bias: Tensor) -> Tensor:
    """``sqrt(‖W − 1 w̄ᵀ‖² + ‖b − b̄ 1‖²)``, with ``w̄``/``b̄`` the mean row/entry: the part of the head
    that the softmax sees (a vector added to every row shifts all logits equally). 0 for ``W = 0``
    and for a head with equal rows; the initialisation interference needs it non-zero."""
    centred_w = weight - weight.mean(-2, keepdim=True)
    centred_b = bias - bias.mean(-1, keepdim=True)
    return torch.sqrt(centred_w.pow(2).sum((-2, -1)) + centred_b.pow(2).sum(-1))


def head_write(state: HeadState, features: Tensor, coeff: Tensor) -> HeadState:
    """``W ← W + Aᵀ Φ``, ``b ← b + Aᵀ 1`` and record the entry ``(Φ, A)``.

    A gradient step ``W ← W − α ∇_W L`` is ``head_write(state, Φ, −α ∂L/∂Z)`` because
    ``∇_W L = (∂L/∂Z)ᵀ Φ`` and ``∇_b L = (∂L/∂Z)ᵀ 1``.
    """
    trace = state.trace._replace(
        features=state.trace.features + (features,), coeffs=state.trace.coeffs + (coeff,)
    )
    weight = state.weight + coeff.transpose(-1, -2) @ features
    return HeadState(weight, state.bias + coeff.sum(-2), trace)


def head_adjust(
    state: HeadState, coeff_deltas: tuple[Tensor, ...], noise_weight: Tensor, noise_bias: Tensor
) -> HeadState:
    """``A_τ ← A_τ + ΔA_τ`` for every entry and ``ξ ← ξ + Δξ``, the head following:
    ``W ← W + Σ_τ ΔA_τᵀ Φ_τ + Δξ_W``, ``b ← b + Σ_τ ΔA_τᵀ 1 + Δξ_b``. Any inner optimiser
    that is linear in the gradients (momentum, ...) updates the head this way."""
    t = state.trace
    weight, bias = state.weight + noise_weight, state.bias + noise_bias
    for delta, feats in zip(coeff_deltas, t.features):
        weight = weight + delta.transpose(-1, -2) @ feats
        bias = bias + delta.sum(-2)
    trace = t._replace(
        coeffs=tuple(a + d for a, d in zip(t.coeffs, coeff_deltas)),
        noise_weight=t.noise_weight + noise_weight,
        noise_bias=t.noise_bias + noise_bias,
    )
    return HeadState(weight, bias, trace)


def head_shrink(state: HeadState, factor: float) -> HeadState:
    """Pull towards the initial head: ``W ← W_0 + c (W − W_0)`` (same for ``b``).

    A proximal pull ``−αγ (W − W_0)`` is ``factor = 1 − αγ``; in the trace every earlier
    ``A_τ`` and the noise are scaled by ``c``, so eq. (1) keeps holding.
    """
    t = state.trace
    trace = t._replace(
        coeffs=tuple(factor * a for a in t.coeffs),
        noise_weight=factor * t.noise_weight,
        noise_bias=factor * t.noise_bias,
    )
    weight = t.weight0 + factor * (state.weight - t.weight0)
    bias = t.bias0 + factor * (state.bias - t.bias0)
    return HeadState(weight, bias, trace)


def head_add_noise(state: HeadState, noise_weight: Tensor, noise_bias: Tensor) -> HeadState:
    """``W ← W + ε_W``, ``b ← b + ε_b``; the trace accumulates ``ξ``."""
    t = state.trace
    trace = t._replace(
        noise_weight=t.noise_weight + noise_weight, noise_bias=t.noise_bias + noise_bias
    )
    return HeadState(state.weight + noise_weight, state.bias + noise_bias, trace)


def head_displacement(state: HeadState) -> tuple[Tensor, Tensor]:
    """``(W − W_0, b − b_0)`` from the trace, ``(Σ_τ A_τᵀ Φ_τ + ξ_W, Σ_τ A_τᵀ 1 + ξ_b)``: the same
    value as subtracting the initial head from the materialised one, without its cancellation
    (which loses ``log10(‖W_0‖ / ‖W − W_0‖)`` digits in float32)."""
    t = state.trace
    weight, bias = t.noise_weight, t.noise_bias
    for feats, coeff in zip(t.features, t.coeffs):
        weight = weight + coeff.transpose(-1, -2) @ feats
        bias = bias + coeff.sum(-2)
    return weight, bias


def kernel(support_features: Tensor, query_features: Tensor) -> Tensor:
    """``k(s, q) = ⟨φ_s, φ_q⟩ + 1`` (the ``+1`` is the bias): ``[..., n_s, n_q]``."""
    return support_features @ query_features.transpose(-1, -2) + 1.0


def reconstruct_logits(trace: HeadTrace, query_features: Tensor) -> Tensor:
    """Eq. (1): ``z_q = W_0 φ_q + b_0 + Σ_τ Σ_s A_τ,s k_τ(s, q) + ξ_W φ_q + ξ_b``."""
    logits = readout(query_features, trace.weight0 + trace.noise_weight, trace.bias0 + trace.noise_bias)
    for feats, coeff in zip(trace.features, trace.coeffs):
        logits = logits + kernel(feats, query_features).transpose(-1, -2) @ coeff
    return logits
