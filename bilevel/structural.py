"""Terms of the encoder meta-gradient that are exactly zero by construction, and the ablations
that therefore change nothing (``docs/theory.md`` §3.1, §3.2).

* ``init`` = ``Σ_q sg(g_q)ᵀ W_0 dφ_q`` vanishes when every inner loop starts from ``W_0 = 0``:
  ``head.policy=zeroing``.
* ``coefficient`` = ``Σ sg(g_q)ᵀ dA_τ,s sg(k_τ(s, q))`` vanishes for first-order unrolled
  algorithms (``A`` is a constant) and for one unrolled inner step from ``W_0 = b_0 = 0``: the
  support predictions are then uniform whatever the encoder, so ``A_0 = −α(P⁰ − Y)/n_s`` does
  not depend on it.
* ``contrastive_support`` (the support side of ``contrastive``) vanishes at first order.

``tests/test_structural.py`` checks every rule against a real decomposition (the term is 0).
"""
from __future__ import annotations

from typing import Optional

from .ablation import Ablation
from .algorithm import BilevelAlgorithm
from .unrolled import UnrolledAlgorithm


def structural_zeros(algorithm: BilevelAlgorithm, head_policy: str,
                     terms: Optional[tuple[str, ...]] = None) -> dict[str, str]:
    """The terms (default: the algorithm's) that are exactly 0 under this configuration, each
    with the reason."""
    terms = algorithm.terms if terms is None else terms
    zero_head = head_policy == "zeroing"
    unrolled = isinstance(algorithm, UnrolledAlgorithm)
    first_order = unrolled and algorithm.config.order == "first_order"
    zeros: dict[str, str] = {}
    if zero_head and "init" in terms:
        zeros["init"] = "head.policy=zeroing starts every inner loop from W_0 = 0"
    if "coefficient" in terms:
        if first_order:
            zeros["coefficient"] = "first order: what the support samples write into the head is a constant"
        elif unrolled and zero_head and algorithm.train_steps == 1:
            zeros["coefficient"] = ("one inner step from a zero head: the support predictions are uniform "
                                    "whatever the encoder")
    if first_order and "contrastive_support" in terms:
        zeros["contrastive_support"] = "first order: the support features receive no gradient"
    return zeros


def idle_ablation_warning(ablation: Ablation, algorithm: BilevelAlgorithm, zeros: dict[str, str],
                          name: str) -> Optional[str]:
    """A warning when the ablation removes only terms that are exactly 0 here (so the run is the
    plain algorithm); None otherwise."""
    removed = [t for t in ablation.terms if t not in ablation.kept]
    if ablation.plain or not removed or any(t not in zeros for t in removed):
        return None
    reasons = "; ".join(f"{t}: {zeros[t]}" for t in removed)
    return (f"ablation={name} removes only {', '.join(removed)}, which {'is' if len(removed) == 1 else 'are'} "
            f"exactly 0 under this configuration ({reasons}): this run trains the plain algorithm. "
            f"Change head.policy, algorithm.inner_steps or algorithm.order to make the ablation matter.")
