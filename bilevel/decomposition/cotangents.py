"""Exact split of the meta-gradient into contrastive and interference terms (docs/theory.md §3).

With ``g_q = ∂L_Q/∂z_q`` and the head written as eq. (1), the meta-gradient is the
vector-Jacobian product of the *nodes* ``(φ_q, Φ_τ, A_τ, W_0, b_0)`` with the cotangents

    φ_q : g_q W_0  +  Σ_τ Σ_s C_τ[s,q] Φ_τ[s]  +  g_q ξ_W
    Φ_τ : Σ_q C_τ[s,q] φ_q                         C_τ[s,q] = g_q · A_τ,s   (pair weights)
    A_τ : Σ_q g_q k_τ(s, q)
    (W_0, b_0) : (Σ_q g_q φ_qᵀ, Σ_q g_q)          (the head's direct readout gradient)

Each term keeps one
group of these cotangents, which is the gradient of its surrogate with everything else
stop-gradiented:

    contrastive   Σ sg(C_τ[s,q]) k_τ(s,q)
    init          Σ_q sg(g_q)ᵀ (W_0 φ_q + b_0)         (encoder part: docs/theory.md §3's sg(W_0) form;
                                                        head part: the direct readout gradient)
    coefficient   Σ sg(g_q)ᵀ A_τ,s sg(k_τ(s,q))
    noise         Σ_q sg(g_q)ᵀ sg(ξ_W) φ_q             (``solver_residual`` for iMAML's R)
    solve_error   no node cotangent: what an approximate implicit solve adds (bilevel.hypergrad.implicit)

``contrastive_query`` and ``contrastive_support`` split the contrastive term into its
query-feature and support-feature sides (the ``one_sided`` ablation drops the latter).

By linearity of the VJP the terms sum to the meta-gradient; the identity check compares
that sum with the algorithm's own hypergradient, computed independently.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from bilevel.primitives.head import HeadTrace, kernel

TERMS = (
    "contrastive", "contrastive_query", "contrastive_support", "init", "coefficient", "noise",
    "solver_residual", "solve_error", "encoder_noise",
)
"""Every term name the engine knows; an algorithm declares the subset it produces."""


class Nodes(NamedTuple):
    """What the query loss depends on: query features, the trace's features and coefficients,
    and its initial head ``(W_0, b_0)`` (a function of the meta-parameters: the meta head itself
    for MAML, zeros for a closed-form head)."""

    query_features: Tensor
    features: tuple[Tensor, ...]
    coeffs: tuple[Tensor, ...]
    weight0: Tensor
    bias0: Tensor

    @classmethod
    def of(cls, trace: HeadTrace, query_features: Tensor) -> "Nodes":
        """The nodes of a forward that read ``query_features`` through the head of ``trace``."""
        return cls(query_features, trace.features, trace.coeffs, trace.weight0, trace.bias0)

    def zeros(self) -> "Nodes":
        """A zero cotangent of the same structure."""
        return Nodes(*(tuple(torch.zeros_like(t) for t in f) if isinstance(f, tuple) else torch.zeros_like(f)
                       for f in self))


def pair_weights(trace: HeadTrace, logits_grad: Tensor) -> Tensor:
    """``C_τ[s, q] = g_q · A_τ,s`` stacked over entries: ``[..., entries, n_s, n_q]`` (a trace
    with at least one entry: :func:`pair_statistics` handles an empty one)."""
    return torch.stack([a @ logits_grad.transpose(-1, -2) for a in trace.coeffs], dim=-3)


def pair_statistics(trace: HeadTrace, query_features: Tensor,
                    logits_grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The pair weights (:func:`pair_weights`) and the cosines of the query features with the
    first entry's support features (:func:`cosine_matrix`). ``(None, None)`` for a trace with no
    entries — an inner loop that never writes the head (head-frozen, e.g. BOIL): no support sample
    reaches the query logits, so there are no pairs and no support features to compare."""
    if not trace.coeffs:
        return None, None
    return pair_weights(trace, logits_grad), cosine_matrix(trace.features[0], query_features)


def term_cotangents(
    trace: HeadTrace, query_features: Tensor, logits_grad: Tensor, terms: tuple[str, ...]
) -> dict[str, Nodes]:
    """The node cotangents of each term in ``terms`` (see the module docstring).

    ``init`` also carries the head's direct readout gradient ``(Σ_q g_q φ_qᵀ, Σ_q g_q)`` on
    ``(W_0, b_0)``. ``noise`` and ``solver_residual`` both read the trace's additive matrix
    ``ξ_W``; an algorithm produces at most one of them. ``solve_error`` does not flow through the
    nodes (its cotangent is zero): the implicit rule adds it directly.
    """
    g = logits_grad
    zero = Nodes.of(trace, query_features).zeros()
    out: dict[str, Nodes] = {}
    for term in terms:
        if term == "init":
            head_w, head_b = readout_head_gradient(query_features, g)
            out[term] = zero._replace(query_features=g @ trace.weight0, weight0=head_w, bias0=head_b)
        elif term in ("noise", "solver_residual"):
            out[term] = zero._replace(query_features=g @ trace.noise_weight)
        elif term == "solve_error":
            out[term] = zero
        elif term in ("contrastive", "contrastive_query", "contrastive_support"):
            weights = [a @ g.transpose(-1, -2) for a in trace.coeffs]
            phi, feats = zero.query_features, zero.features
            if term != "contrastive_support":
                for c, f in zip(weights, trace.features):
                    phi = phi + c.transpose(-1, -2) @ f
            if term != "contrastive_query":
                feats = tuple(c @ query_features for c in weights)
            out[term] = zero._replace(query_features=phi, features=feats)
        elif term == "coefficient":
            out[term] = zero._replace(coeffs=tuple(kernel(f, query_features) @ g for f in trace.features))
        else:
            raise ValueError(f"unknown term {term!r}; the engine knows {', '.join(TERMS)}")
    return out


def stack_nodes(cotangents: list[Nodes]) -> Nodes:
    """Stack a list of node cotangents along a new leading axis (for one batched VJP)."""
    return Nodes(*(
        tuple(torch.stack(group) for group in zip(*fields)) if isinstance(fields[0], tuple) else torch.stack(fields)
        for fields in zip(*cotangents)
    ))


def sum_nodes(cotangents: list[Nodes]) -> Nodes:
    """The sum of a non-empty list of node cotangents (the cotangent of a sum of terms)."""
    return Nodes(*(
        tuple(sum(group) for group in zip(*fields)) if isinstance(fields[0], tuple) else sum(fields)
        for fields in zip(*cotangents)
    ))


def readout_head_gradient(query_features: Tensor, logits_grad: Tensor) -> tuple[Tensor, Tensor]:
    """The head's direct readout gradient ``(Σ_q g_q φ_qᵀ, Σ_q g_q)`` (per leading index)."""
    return logits_grad.transpose(-1, -2) @ query_features, logits_grad.sum(-2)


def class_masks(support_y: Tensor, query_y: Tensor) -> Tensor:
    """``[..., n_s, n_q]`` boolean: support and query sample share a label."""
    return support_y.unsqueeze(-1) == query_y.unsqueeze(-2)


def cosine_matrix(support_features: Tensor, query_features: Tensor) -> Tensor:
    """Cosine similarity of every support–query feature pair: ``[..., n_s, n_q]``."""
    s = torch.nn.functional.normalize(support_features, dim=-1)
    q = torch.nn.functional.normalize(query_features, dim=-1)
    return s @ q.transpose(-1, -2)

