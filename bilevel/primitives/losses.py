"""Cross-entropy on logits and its closed-form logits gradient.

``L = (1/n) Σ_i CE(z_i, y_i)`` and ``∂L/∂Z = (softmax(Z) − onehot(Y)) / n`` (docs/theory.md §1:
``G_S`` and ``g_q``). The closed form is differentiable, so it serves second-order inner
loops too, and it works with any number of leading batch dimensions.
"""
from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the sample axis (``-2``); leading dims are kept."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(-1)


def cross_entropy_logits_grad(logits: Tensor, labels: Tensor) -> Tensor:
    """``∂ mean-CE / ∂ logits = (softmax(z) − onehot(y)) / n`` with ``n`` the sample count."""
    n = logits.shape[-2]
    classes = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (labels.unsqueeze(-1) == classes).to(logits.dtype)
    return (torch.softmax(logits, dim=-1) - onehot) / n


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions over the sample axis (no host sync)."""
    return (logits.argmax(-1) == labels).to(logits.dtype).mean(-1)
