"""Terms of the encoder meta-gradient that are exactly zero by construction, and the ablations
that therefore change nothing (``docs/theory.md`` §3.1, §3.2).

* ``init`` = ``Σ_q sg(g_q)ᵀ W_0 dφ_q`` vanishes when every inner loop starts from ``W_0 = 0``:
  ``head.policy=zeroing``.
* ``coefficient`` = ``Σ sg(g_q)ᵀ dA_τ,s sg(k_τ(s, q))`` vanishes for first-order unrolled
  algorithms (``A`` is a constant) and for one unrolled inner step from ``W_0 = b_0 = 0``: the
  support predictions are then uniform whatever the encoder, so ``A_0 = −α(P⁰ − Y)/n_s`` does
  not depend on it.
* ``contrastive_support`` (the support side of ``contrastive``) vanishes at first order.

Each algorithm states its own rules (:meth:`~bilevel.algorithm.BilevelAlgorithm.structural_zeros`:
the ``init`` rule for every algorithm whose ``W_0`` is the meta head, the others in
:class:`~bilevel.hypergrad.unrolled.UnrolledAlgorithm`; a closed-form head states its own).
``tests/test_structural.py`` checks every rule against a real decomposition (the term is 0).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from bilevel.decomposition.ablation import Ablation

if TYPE_CHECKING:
    from bilevel.algorithm import BilevelAlgorithm


def structural_zeros(algorithm: BilevelAlgorithm, head_policy: str,
                     terms: Optional[tuple[str, ...]] = None) -> dict[str, str]:
    """The terms (default: the algorithm's) that are exactly 0 on the encoder under this
    configuration, each with the reason: what the algorithm says of itself
    (:meth:`~bilevel.algorithm.BilevelAlgorithm.structural_zeros`)."""
    terms = algorithm.terms if terms is None else terms
    return {t: why for t, why in algorithm.structural_zeros(head_policy).items() if t in terms}


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
