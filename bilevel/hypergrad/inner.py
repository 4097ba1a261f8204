"""The base of the hypergradient rules around an inner solver (unrolled, implicit): the plugin contract.

A plugin's inner solver is one hook, ``inner_loop(params, support, inner) -> InnerResult``: the
meta-parameters, one :class:`~bilevel.solvers.support.Support` (the task's support labels, its
images or features, the head to start from) and an :class:`~bilevel.solvers.support.InnerConfig`
(the config's typed ``inner``, or a copy with other ``steps``/``order``). Evaluation is built from
the same hook, so a plugin that honours ``support.head`` and ``inner.steps`` gets it for free.
"""
from __future__ import annotations

from abc import abstractmethod
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor

from bilevel.algorithm import BilevelAlgorithm
from bilevel.data.batch import TaskBatch
from bilevel.execution.mapping import map_tasks
from bilevel.primitives.head import init_head, readout
from bilevel.primitives.losses import accuracy
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import ENCODER_PREFIX, Params, encoder_part, tree_detach
from bilevel.solvers.support import InnerConfig, InnerResult, Support


class InnerLoopAlgorithm(BilevelAlgorithm):
    """An algorithm around an inner solver (module docstring). Subclasses implement
    :meth:`inner_loop` (the bases do: SGD steps, a proximal solve) and may declare it
    :attr:`restartable`."""

    def __init__(self, model: BilevelModel, config: Any, execution: Optional[str] = None) -> None:
        if config.inner.steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {config.inner.steps}")
        super().__init__(model, config, execution)

    @abstractmethod
    def inner_loop(self, params: Params, support: Support, inner: InnerConfig) -> InnerResult:
        """``inner.steps`` steps (0: the starting state) of the inner solver on ``support``, from
        ``support.head`` when given (else the algorithm's own initial head, by default the meta head)."""

    @property
    def restartable(self) -> bool:
        """Whether :meth:`inner_loop` restarted at an adapted point (its encoder in ``params``, a
        fresh head at the adapted head) continues the loop exactly. Default False: evaluation then
        runs every step count from the start."""
        return False

    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> Tensor:
        """Query accuracy after ``0 … steps`` inner steps, task by task (:meth:`_evaluate_task`)."""
        mode = "loop" if self.execution == "shared" else self.execution
        return map_tasks(partial(self._evaluate_task, steps=steps), mode, tree_detach(params), batch.support_x,
                         batch.support_y, batch.query_x, batch.query_y)

    def _evaluate_task(self, params: Params, xs, ys, xq, yq, steps: int) -> Tensor:
        """Step 0 is the state :meth:`inner_loop` starts from (``steps=0``: the meta head, or whatever
        initial head the plugin builds); each further step continues from the previous adapted state
        (``steps=1`` from it) when :attr:`restartable`, else runs ``t`` steps from the start. With
        ``adapt="head"`` the features are computed once."""
        inner, encoder = self.config.inner, encoder_part(params)
        head_only = inner.adapt == "head"
        support = Support(ys, features=self.model.encode(encoder, xs)) if head_only else Support(ys, images=xs)
        phi_q = self.model.encode(encoder, xq) if head_only else None
        found, accs = self.inner_loop(params, support, inner.with_steps(0, first_order=True)), []
        for t in range(steps + 1):
            if t and self.restartable:
                adapted = {**params, **{ENCODER_PREFIX + k: v.detach() for k, v in found.encoder.items()}}
                head = init_head(found.head.weight.detach(), found.head.bias.detach())
                found = self.inner_loop(adapted, support._replace(head=head), inner.with_steps(1, first_order=True))
            elif t:
                found = self.inner_loop(params, support, inner.with_steps(t, first_order=True))
            feats = phi_q if head_only else self.model.encode(found.encoder, xq)
            accs.append(accuracy(readout(feats, found.head.weight, found.head.bias), yq))
        return torch.stack(accs)
