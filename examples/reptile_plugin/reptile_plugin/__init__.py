"""Reptile (Nichol, Achiam & Schulman, 2018) as an external ``bilevel`` plugin.

Per task, ``T`` plain SGD steps of size ``α`` on the task's batch (support and query pooled
by default, as Reptile does not separate them at training time), starting at ``θ``; the
outer direction is

    d = (θ − θ_T) / (α T)

the mean of the inner gradients along the trajectory, averaged over the tasks (the plain
``θ − θ_T`` is ``α T d``; with SGD of step ``β`` the update is Reptile's interpolation
``θ ← θ + (β / (α T)) (θ_T − θ)``; the default outer optimiser is the trainer's Adam).

Composition: Reptile is ``bilevel.hypergrad.chain`` with no coupling (γ = 0), no noise (ε = 0) and
``μ`` the last iterate (EMA weight ``a = 1``), scaled by ``s = 1/(α T)``. Everything else,
the vmap/loop paths, evaluation and the decomposition into ``init`` + one-sided
``contrastive`` (docs/theory.md §6), comes from :class:`bilevel.hypergrad.chain.ChainAlgorithm`. Registered
through the ``bilevel.algorithms`` entry point ``reptile`` (see ``pyproject.toml``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bilevel import INNER_LOOP, ChainAlgorithm, ChainConfig, ChainSpec, Check

__all__ = ["Reptile", "ReptileConfig"]


@dataclass
class ReptileConfig(ChainConfig):
    """``inner_steps`` T, ``inner_lr`` α, ``adapt`` (``all``; ``head`` moves only the head and
    gives the encoder its last inner gradient), ``batches`` (default ``pooled``)."""

    checks: ClassVar[dict[str, Check]] = INNER_LOOP

    name: str = "reptile"


class Reptile(ChainAlgorithm):
    """Reptile: the chain's last iterate, ``d = (θ − θ_T)/(α T)``."""

    Config = ReptileConfig

    def spec(self) -> ChainSpec:
        c = self.config
        return ChainSpec(
            steps=c.inner_steps, lr=c.inner_lr, gamma=0.0, noise=0.0, ema=1.0,
            scale=1.0 / (c.inner_lr * c.inner_steps), adapt=c.adapt,
        )
