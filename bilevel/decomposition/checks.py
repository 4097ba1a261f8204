"""The two checks that make a decomposition trustworthy: the identity (the terms sum to the
algorithm's own hypergradient) and the reconstruction (eq. (1) rebuilds the logits)."""
from __future__ import annotations


from torch import Tensor

from bilevel.primitives.head import HeadTrace, reconstruct_logits
from bilevel.primitives.params import Params, tree_norm, tree_sum


def reconstruction_error(trace: HeadTrace, query_features: Tensor, logits: Tensor) -> Tensor:
    """``max |z_rec − z|`` between eq. (1) and the logits the model produced."""
    return (reconstruct_logits(trace, query_features) - logits).abs().amax()


def identity_error(terms: dict[str, Params], total: Params) -> Tensor:
    """``‖Σ_k term_k − total‖ / ‖total‖`` over all parameters."""
    summed = tree_sum(list(terms.values()))
    diff = {k: summed[k] - total[k] for k in total}
    return tree_norm(diff) / tree_norm(total).clamp_min(1e-30)
