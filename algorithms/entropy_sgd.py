"""Entropy-SGD (Chaudhari et al., ICLR 2017, Algorithm 1) in the few-shot setting (docs/theory.md §6).

Per task, an SGLD chain on the task's batch ``B`` (support, query, or both pooled:
``batches``) over the adapted set, coupled to the current parameters ``x`` with strength
``γ_t`` (``bilevel.hypergrad.chain`` states the chain, its noise convention ``x' ← x' − η' dx' +
sqrt(η') ε n`` and its EMA convention ``μ ← (1 − a) μ + a x'``, ``μ_0 = x``). The outer
direction is ``d = γ_t (x − μ_L)``, the negative local-entropy gradient, averaged over the
tasks of the meta-batch; the trainer's SGD with step ``η = outer_lr`` makes the update
``x ← x − η d``. γ-scoping: ``γ_t = γ_0 (1 + γ_1)^t`` with ``t`` the number of outer steps
done (advanced by :meth:`outer_step_done`, kept by :meth:`state_dict`). With
``adapt = "head"`` the encoder stays at ``θ`` in the chain and follows the chain-EMA of its
own gradient (``bilevel.hypergrad.chain``).

Unlike the authors' code, the EMA weight ``a`` is a parameter (their 0.75 on the old mean is
``a = 0.25``), the scoping counter advances, and γ is not folded into the learning rate.
Their noise ``sqrt(2η') ε`` per step is ``sqrt(2)`` times ours for the same ``ε``.

The noise comes from the algorithm's own ``torch.Generator`` (seeded by ``seed``, state
checkpointed), drawn outside the per-task function, so ``vmap``, ``loop`` and the
decomposition see the same draws. Exact limit (claim 9): with ``L = 1`` and ``ε = 0`` the
coupling never acts (``x'_0 = x``), so ``d = a η' γ ∇f_B(x)`` exactly, a plain SGD step of
size ``η a η' γ``; for ``L`` steps with ``η'γ = κ`` fixed and ``γ → ∞``,
``d → Σ_{k=1}^{L} a (1 − a)^{L−k} (1 − (1 − κ)^k) ∇f_B(x)`` with an ``O(1/γ)`` error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from bilevel import (
    HEAD_WEIGHT, INNER_LOOP, NON_NEGATIVE, POSITIVE, BilevelModel, ChainAlgorithm, ChainConfig, ChainSpec, Check,
    Params, Range, draw_noise,
)


@dataclass
class EntropySGDConfig(ChainConfig):
    """``inner_steps`` L, ``inner_lr`` η', ``gamma0``/``gamma1`` the scoping
    ``γ_t = γ_0 (1 + γ_1)^t``, ``noise`` ε, ``ema`` a, ``outer_lr`` η, ``seed`` of the noise."""

    checks: ClassVar[dict[str, Check]] = {
        **INNER_LOOP, "gamma0": POSITIVE, "gamma1": NON_NEGATIVE, "noise": NON_NEGATIVE,
        "ema": Range(low=0, high=1, low_open=True), "outer_lr": POSITIVE, "seed": NON_NEGATIVE,
    }

    name: str = "entropy_sgd"
    gamma0: float = 1.0
    gamma1: float = 1e-4
    noise: float = 1e-4
    ema: float = 0.75
    outer_lr: float = 1.0
    seed: int = 0


class EntropySGD(ChainAlgorithm):
    """Entropy-SGD: the chain's ``prox_mean`` direction with ``s = γ_t``."""

    Config = EntropySGDConfig

    def __init__(self, model: BilevelModel, config: Any, execution: Optional[str] = None) -> None:
        super().__init__(model, config, execution)
        self.outer_steps = 0
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[Tensor] = None

    @property
    def gamma(self) -> float:
        """``γ_t = γ_0 (1 + γ_1)^t``."""
        return self.config.gamma0 * (1.0 + self.config.gamma1) ** self.outer_steps

    def spec(self) -> ChainSpec:
        c = self.config
        g = self.gamma
        return ChainSpec(steps=c.inner_steps, lr=c.inner_lr, gamma=g, noise=c.noise, ema=c.ema, scale=g, adapt=c.adapt)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
        return self._generator

    def noise(self, params: Params, spec: ChainSpec, tasks: int) -> Optional[Params]:
        if not spec.noise:
            return None
        return draw_noise(self._generator_for(params[HEAD_WEIGHT].device), params, spec, tasks)

    def extras(self, spec: ChainSpec) -> dict[str, Tensor]:
        return {"entropy_sgd/gamma": torch.tensor(spec.gamma, dtype=torch.float64)}

    def make_outer_optimizer(self, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
        """SGD with step ``outer_lr`` (the trainer's ``lr`` is not used): ``x ← x − η d``."""
        return torch.optim.SGD(params, lr=self.config.outer_lr)

    def outer_step_done(self) -> None:
        self.outer_steps += 1

    def state_dict(self) -> dict[str, Any]:
        state = self._generator.get_state() if self._generator is not None else self._generator_state
        return {"outer_steps": self.outer_steps, "generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer_steps = int(state["outer_steps"])
        self._generator_state = state["generator"]
        self._generator = None
