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
    solve_error   no node cotangent: what an approximate implicit solve adds (bilevel.implicit)

``contrastive_query`` and ``contrastive_support`` split the contrastive term into its
query-feature and support-feature sides (the ``one_sided`` ablation drops the latter).

By linearity of the VJP the terms sum to the meta-gradient; the identity check compares
that sum with the algorithm's own hypergradient, computed independently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import tags
from .head import HeadTrace, kernel, reconstruct_logits
from .params import ENCODER_PREFIX, Params, tree_norm, tree_sum, tree_vdot

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
    """``C_τ[s, q] = g_q · A_τ,s`` stacked over entries: ``[..., entries, n_s, n_q]``."""
    return torch.stack([a @ logits_grad.transpose(-1, -2) for a in trace.coeffs], dim=-3)


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


def reconstruction_error(trace: HeadTrace, query_features: Tensor, logits: Tensor) -> Tensor:
    """``max |z_rec − z|`` between eq. (1) and the logits the model produced."""
    return (reconstruct_logits(trace, query_features) - logits).abs().amax()


def class_masks(support_y: Tensor, query_y: Tensor) -> Tensor:
    """``[..., n_s, n_q]`` boolean: support and query sample share a label."""
    return support_y.unsqueeze(-1) == query_y.unsqueeze(-2)


def cosine_matrix(support_features: Tensor, query_features: Tensor) -> Tensor:
    """Cosine similarity of every support–query feature pair: ``[..., n_s, n_q]``."""
    s = torch.nn.functional.normalize(support_features, dim=-1)
    q = torch.nn.functional.normalize(query_features, dim=-1)
    return s @ q.transpose(-1, -2)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` (broadcast) holds; 0 when the mask is empty."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class Decomposition:
    """The decomposition of one meta-batch's meta-gradient (means over its tasks).

    ``terms[name]`` is a parameter-shaped gradient over all parameters; they sum to
    ``total`` (the algorithm's own hypergradient) up to ``identity_error``.
    ``pair_weights[i, τ, s, q] = C_τ[s, q]`` for task ``i``; ``feature_cosines[i, s, q]`` is
    the cosine of the query feature used in the readout and the support feature of the
    first inner step. ``encoder_adaptation`` (full-network inner loops only) is the part of
    the feature terms that flows through the Jacobian of the encoder's inner updates
    beyond the identity (docs/theory.md §3.3) — a diagnostic that overlaps the terms, not a term.
    """

    terms: dict[str, Params]
    total: Params
    pair_weights: Tensor
    feature_cosines: Tensor
    same_class: Tensor
    reconstruction_error: Tensor
    identity_error: Tensor
    encoder_adaptation: Optional[Params] = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def combine(self, keep: tuple[str, ...]) -> Params:
        """The ablated meta-gradient: the sum of the ``keep`` terms on the encoder, the exact
        ``total`` on everything else (the head, and meta-parameters of the algorithm's own, are
        never ablated)."""
        return {k: sum(self.terms[t][k] for t in keep) if k.startswith(ENCODER_PREFIX) else v
                for k, v in self.total.items()}

    def summary(self) -> dict[str, Tensor]:
        """Scalar statistics (0-d tensors, no host sync), keyed by their TensorBoard tag.

        Norms, cosines and shares are over the encoder parameters, the part the terms
        explain (the head always receives its exact meta-gradient). ``share`` is the
        projection ``⟨term, total⟩ / ‖total‖²``; the shares sum to 1 up to the identity error.
        """
        enc = [k for k in self.total if k.startswith(ENCODER_PREFIX)]
        total = {k: self.total[k] for k in enc}
        total_sq = tree_vdot(total, total).clamp_min(torch.finfo(self.identity_error.dtype).tiny)
        out: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            t = {k: term[k] for k in enc}
            dot = tree_vdot(t, total)
            norm = tree_norm(t)
            out[tags.decomp(name, tags.NORM)] = norm
            out[tags.decomp(name, tags.COS_TOTAL)] = dot / (norm * total_sq.sqrt()).clamp_min(1e-30)
            out[tags.decomp(name, tags.SHARE)] = dot / total_sq
        if self.encoder_adaptation is not None:
            out[tags.decomp(tags.ENCODER_ADAPTATION, tags.NORM)] = tree_norm(
                {k: self.encoder_adaptation[k] for k in enc}
            )
        out[tags.decomp(tags.TOTAL, tags.NORM)] = total_sq.sqrt()
        out[tags.CHECK_RECONSTRUCTION] = self.reconstruction_error
        out[tags.CHECK_IDENTITY] = self.identity_error
        weights = self.pair_weights.sum(-3)
        out[tags.PAIRS_SAME_CLASS] = masked_mean(weights, self.same_class)
        out[tags.PAIRS_DIFF_CLASS] = masked_mean(weights, ~self.same_class)
        out[tags.COS_SAME_CLASS] = masked_mean(self.feature_cosines, self.same_class)
        out[tags.COS_DIFF_CLASS] = masked_mean(self.feature_cosines, ~self.same_class)
        out.update(self.extras)
        return out


def identity_error(terms: dict[str, Params], total: Params) -> Tensor:
    """``‖Σ_k term_k − total‖ / ‖total‖`` over all parameters."""
    summed = tree_sum(list(terms.values()))
    diff = {k: summed[k] - total[k] for k in total}
    return tree_norm(diff) / tree_norm(total).clamp_min(1e-30)
