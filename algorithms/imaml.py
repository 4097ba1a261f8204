"""iMAML (Rajeswaran et al., 2019): the engine's implicit part around a proximal gradient descent.

Inner problem ``φ* = argmin_φ L_S(φ) + (λ/2)‖φ − φ_0‖²`` over the adapted set, solved by
``inner_steps`` gradient-descent steps of size ``inner_lr`` (:func:`bilevel.solvers.proximal.proximal_solve`,
which records the head trace). Meta-gradient: the implicit one, ``u = (I + H/λ)⁻¹ ∇_φ L_Q(φ*)`` by
``cg_iters`` CG iterations, at whatever point the solver returned; its decomposition, exact at any
CG budget thanks to the ``solve_error`` term, comes from :mod:`bilevel.hypergrad.implicit` (docs/theory.md §5).

``adapt="head"`` (default): ``φ = (W, b)``, a strongly convex problem (CE is convex in the head,
plus ``λ/2‖·‖²``), so the solver converges to the unique ``φ*``, CG converges and the implicit
function theorem applies; the encoder gets the mixed term ``−(∂²L_S/∂θ∂W) u/λ``. ``adapt="all"``:
every parameter is adapted (non-convex; no such guarantee). ``damping`` c and ``lam_offset`` e
select the authors' system ``((1 + c) I + H/(λ + e)) u = g`` (0, 0: the paper's).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Optional

import torch
from torch import Tensor

from bilevel import (
    AT_LEAST_1, ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, INNER_LOOP, NON_NEGATIVE, POSITIVE, AlgorithmConfig, Check,
    ImplicitAlgorithm, ImplicitSystem, Params, TaskBatch, accuracy, encoder_part, map_tasks, proximal_solve, readout,
    tree_detach,
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


class IMAML(ImplicitAlgorithm):
    """Implicit MAML over the head (default) or the whole network; see the module docstring."""

    Config = IMAMLConfig

    def system(self) -> ImplicitSystem:
        c = self.config
        return ImplicitSystem(c.lam, c.cg_iters, c.damping, c.lam_offset)

    def solve(self, params: Params, support_x: Optional[Tensor], support_y: Tensor,
              support_features: Optional[Tensor]) -> Params:
        c = self.config
        found = proximal_solve(self.model, params, support_x, support_y, steps=c.inner_steps, lr=c.inner_lr,
                               lam=c.lam, adapt=c.adapt, support_features=support_features)
        head = {HEAD_WEIGHT: found.head.weight, HEAD_BIAS: found.head.bias}
        return head if c.adapt == "head" else {**{ENCODER_PREFIX + k: v for k, v in found.encoder.items()}, **head}

    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> Tensor:
        """Query accuracy after ``0 … steps`` solver steps (``[tasks, steps + 1]``): head-only, the
        head continues step by step; full network, each count restarts from the meta-parameters
        (the solver anchors the encoder where it starts)."""
        return map_tasks(partial(self._evaluate_task, steps=steps), self.execution, tree_detach(params),
                         batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def _evaluate_task(self, params: Params, xs, ys, xq, yq, steps: int) -> Tensor:
        c = self.config
        solve = partial(proximal_solve, self.model, params, lr=c.inner_lr, lam=c.lam, adapt=c.adapt)
        accs = []
        if c.adapt == "head":
            encoder = encoder_part(params)
            phi_s, phi_q = self.model.encode(encoder, xs), self.model.encode(encoder, xq)
            head = solve(None, ys, steps=0, support_features=phi_s).head
            for t in range(steps + 1):
                head = solve(None, ys, steps=1, support_features=phi_s, head=head).head if t else head
                accs.append(accuracy(readout(phi_q, head.weight, head.bias), yq))
        else:
            for t in range(steps + 1):
                found = solve(xs, ys, steps=t)
                accs.append(accuracy(readout(self.model.encode(found.encoder, xq), found.head.weight,
                                             found.head.bias), yq))
        return torch.stack(accs)
