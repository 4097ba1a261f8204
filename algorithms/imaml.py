"""iMAML (Rajeswaran et al., 2019): the engine's implicit part around a proximal gradient descent.

Inner problem ``φ* = argmin_φ L_S(φ) + (λ/2)‖φ − φ_0‖²`` over the adapted set, solved by
``inner_steps`` gradient-descent steps of size ``inner_lr`` (the base's solver,
:func:`bilevel.solvers.proximal.proximal_solve`, which records the head trace). Meta-gradient: the
implicit one, ``u = (I + H/λ)⁻¹ ∇_φ L_Q(φ*)`` by ``cg_iters`` CG iterations, at whatever point the
solver returned; its decomposition, exact at any CG budget thanks to the ``solve_error`` term,
comes from :mod:`bilevel.hypergrad.implicit` (docs/theory.md §5).

``adapt="head"`` (default): ``φ = (W, b)``, a strongly convex problem (CE is convex in the head,
plus ``λ/2‖·‖²``), so the solver converges to the unique ``φ*``, CG converges and the implicit
function theorem applies; the encoder gets the mixed term ``−(∂²L_S/∂θ∂W) u/λ``. ``adapt="all"``:
every parameter is adapted (non-convex; no such guarantee). ``damping`` c and ``lam_offset`` e
select the authors' system ``((1 + c) I + H/(λ + e)) u = g`` (0, 0: the paper's). Evaluation
(the query accuracy after ``0 … test_steps`` solver steps) comes with the base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bilevel import (
    AT_LEAST_1, INNER_LOOP, NON_NEGATIVE, POSITIVE, AlgorithmConfig, Check, ImplicitAlgorithm, ImplicitSystem,
    InnerConfig,
)


@dataclass
class IMAMLConfig(AlgorithmConfig):
    """``inner_steps`` T and ``inner_lr`` α of the proximal descent, proximal strength ``lam`` λ,
    ``cg_iters`` CG iterations, ``adapt`` in {head, all}, ``damping`` c, ``lam_offset`` e."""

    checks: ClassVar[dict[str, Check]] = {
        **INNER_LOOP, "lam": POSITIVE, "cg_iters": AT_LEAST_1, "damping": NON_NEGATIVE, "lam_offset": NON_NEGATIVE,
    }

    name: str = "imaml"
    inner_steps: int = 10
    inner_lr: float = 0.05
    lam: float = 2.0
    cg_iters: int = 5
    adapt: str = "head"
    damping: float = 0.0
    lam_offset: float = 0.0

    @property
    def inner(self) -> InnerConfig:
        """The solver's steps (no graph is kept through them: the hypergradient is implicit)."""
        return InnerConfig(self.inner_steps, self.inner_lr, adapt=self.adapt, order="first_order")


class IMAML(ImplicitAlgorithm):
    """Implicit MAML over the head (default) or the whole network; see the module docstring."""

    Config = IMAMLConfig

    def system(self) -> ImplicitSystem:
        c = self.config
        return ImplicitSystem(c.lam, c.cg_iters, c.damping, c.lam_offset)
