"""The record of one meta-batch's decomposition and its TensorBoard summary."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from bilevel import tags
from bilevel.decomposition.reduction import MAX, MEAN, ROWS
from bilevel.primitives.params import ENCODER_PREFIX, Params, tree_norm, tree_vdot


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
    ``absent`` names the diagnostics this step does not have, with the reason: an inner loop that
    never writes the head (head-frozen) has ``pair_weights`` with 0 entries and NaN
    ``feature_cosines``, and :meth:`summary` leaves their statistics out rather than report 0.
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
    absent: dict[str, str] = field(default_factory=dict)

    REDUCTION = {"terms": MEAN, "total": MEAN, "encoder_adaptation": MEAN, "extras": MEAN, "pair_weights": ROWS,
                 "feature_cosines": ROWS, "same_class": ROWS, "reconstruction_error": MAX}
    """How the fields reduce over processes; ``identity_error`` is recomputed from the reduced
    ``terms`` and ``total`` (a mean of errors is not the error of the means)."""

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
        if "pair_weights" not in self.absent:
            weights = self.pair_weights.sum(-3)
            out[tags.PAIRS_SAME_CLASS] = masked_mean(weights, self.same_class)
            out[tags.PAIRS_DIFF_CLASS] = masked_mean(weights, ~self.same_class)
        if "feature_cosines" not in self.absent:
            out[tags.COS_SAME_CLASS] = masked_mean(self.feature_cosines, self.same_class)
            out[tags.COS_DIFF_CLASS] = masked_mean(self.feature_cosines, ~self.same_class)
        out.update(self.extras)
        return out
