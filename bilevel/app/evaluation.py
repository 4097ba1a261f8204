"""Held-out evaluation: a fixed task sequence, a fixed task count, per-task accuracies, 95 % CIs.

**Tasks.** A :class:`TaskSet` draws batches of ``eval.batch`` tasks, in order, from a sampler
of its split seeded with ``seed + EVAL_SEED_OFFSET``: the sequence is fixed, and an
evaluation of ``n`` batches always uses its first ``n`` (a prefix), so a given task count
always means the same tasks. Batches are drawn when first needed and kept.

**Count.** By default an evaluation uses every batch up to its task count (``eval.tasks``,
``eval.final_tasks``), whatever the machine's speed or load: the same command evaluates the same
tasks, and its progress bar knows its total (and so its ETA) from the start. Only when a time
budget is asked for (``eval.budget_s`` / ``eval.final_budget_s`` > 0; null or 0: none) does a
set's first evaluation time its first batch (both head variants) and settle the number of
batches for the rest of the run: ``min(max batches, max(1, ⌊budget / seconds per batch⌋))`` —
a count that depends on the machine, logged as such. Every later evaluation of the set uses the
same tasks, so a curve compares like with like; the count used is reported (``eval/tasks``,
``test_tasks``) and kept by checkpoints.

**Statistics.** Each task contributes its query accuracy after ``0 … test_steps`` inner steps;
per step, the mean over the ``n`` tasks and the half-width of its 95 % confidence interval
``1.96 · sd / √n`` (``sd`` with ``n − 1`` degrees of freedom; 0 for one task). The *headline*
is the accuracy after :func:`headline_step` inner steps: the step count training uses,
unless ``eval.headline_step`` names another.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from bilevel import tags
from bilevel.algorithm import BilevelAlgorithm
from bilevel.data import DataConfig, TaskBatch, TaskSampler, build_sampler
from bilevel.errors import ConfigError
from bilevel.app.head_policy import zeroed_head
from bilevel.primitives.params import Params

EVAL_SEED_OFFSET = 10_000  # every evaluation sampler: seed + this
Z_95 = 1.96
log = logging.getLogger(__name__)


def headline_step(algorithm: BilevelAlgorithm, requested: Optional[int]) -> int:
    """The test step the run reports first: ``requested``, else the number of inner steps
    training uses, capped at the test steps. A request past the test steps is an error."""
    if requested is None:
        return min(algorithm.train_steps, algorithm.eval_steps)
    if requested > algorithm.eval_steps:
        raise ConfigError(
            f"eval.headline_step must be <= the test-time inner steps ({algorithm.eval_steps}; "
            f"algorithm.test_steps), got {requested}"
        )
    return requested


def ci95(per_task: Tensor) -> Tensor:
    """Half-width of the 95 % confidence interval of the mean over the task axis (dim 0)."""
    n = per_task.shape[0]
    if n < 2:
        return torch.zeros(per_task.shape[1:], dtype=per_task.dtype)
    return Z_95 * per_task.std(0) / math.sqrt(n)


@dataclass
class Evaluation:
    """One evaluation: per-task accuracies ``[tasks, test_steps + 1]`` with the head as trained
    (``plain``) and with test-time zeroing (``zeroed``), the headline step and the time taken."""

    plain: Tensor
    zeroed: Tensor
    headline: int
    seconds: float

    @property
    def tasks(self) -> int:
        return self.plain.shape[0]

    def scalars(self, prefix: str) -> dict[str, float]:
        """``{prefix}/accuracy`` (the headline) and its CI bounds, ``{prefix}/accuracy_step_k`` and
        ``{prefix}/ci95_step_k`` for every step, ``{prefix}/tasks``; the same under
        ``{prefix}_zeroed/`` for test-time zeroing."""
        out: dict[str, float] = {tags.tasks(prefix): float(self.tasks)}
        for name, accs in ((prefix, self.plain), (tags.zeroed(prefix), self.zeroed)):
            mean, half = accs.mean(0), ci95(accs)
            out[tags.accuracy(name)] = float(mean[self.headline])
            out[tags.accuracy_low(name)] = float(mean[self.headline] - half[self.headline])
            out[tags.accuracy_high(name)] = float(mean[self.headline] + half[self.headline])
            out.update({tags.accuracy_step(name, k): float(m) for k, m in enumerate(mean)})
            out.update({tags.ci95_step(name, k): float(h) for k, h in enumerate(half)})
        return out


@dataclass(frozen=True)
class TaskSetSpec:
    """Which tasks an evaluation uses: at most ``tasks`` tasks of ``split`` in batches of ``batch``,
    from the sequence seeded by ``seed + EVAL_SEED_OFFSET``, within ``budget_s`` seconds (None or 0:
    no budget, every task)."""

    split: str
    tasks: int
    batch: int
    budget_s: Optional[float]
    seed: int


class TaskSet:
    """The fixed evaluation tasks of one split and their settled count (module docstring)."""

    def __init__(self, data_cfg: DataConfig, spec: TaskSetSpec, device: torch.device, dtype: torch.dtype,
                 share: Callable[[TaskSampler], TaskSampler] = lambda sampler: sampler) -> None:
        size = min(spec.batch, spec.tasks)
        self.split, self.budget_s, self.size = spec.split, spec.budget_s or 0.0, size
        self.max_batches = math.ceil(spec.tasks / size)
        self.batches: Optional[int] = None if self.budget_s > 0 else self.max_batches  # a budget: settled by the first evaluation
        self._sampler = share(build_sampler(data_cfg, spec.split, size, seed=spec.seed + EVAL_SEED_OFFSET))
        self._drawn: list[TaskBatch] = []
        self._device, self._dtype = device, dtype

    def batch(self, i: int) -> TaskBatch:
        """The ``i``-th batch of the sequence (drawn, in order, when first needed)."""
        while len(self._drawn) <= i:
            self._drawn.append(self._sampler.sample().to(self._device, self._dtype))
        return self._drawn[i]

    def settle(self, seconds_per_batch: float) -> int:
        """Fix the number of batches from the time one batch took (see the module docstring)."""
        if self.budget_s > 0:
            self.batches = min(self.max_batches, max(1, int(self.budget_s // max(seconds_per_batch, 1e-9))))
            log.info(f"{self.split}: {self.batches * self.size} of {self.max_batches * self.size} tasks fit the "
                     f"{self.budget_s:g}-second time budget (a count that depends on this machine's speed and load; "
                     f"without a budget every task is evaluated)")
        else:
            self.batches = self.max_batches
        return self.batches


Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after every batch (``total`` may shrink once settled)."""

Gather = Callable[[Tensor, TaskBatch, float], tuple[Tensor, float]]
"""``gather(rows, batch, seconds)``: this process's per-task rows of ``batch`` → the whole batch's,
and the time that settles the budget (a run over many processes: the slowest share's)."""


def evaluate(algorithm: BilevelAlgorithm, params: Params, tasks: TaskSet, headline: int,
             progress: Optional[Progress] = None,
             gather: Gather = lambda rows, batch, seconds: (rows, seconds)) -> Evaluation:
    """Per-task accuracies after ``0 … algorithm.eval_steps`` inner steps on the set's tasks,
    with the head as trained and zeroed; settles the set's task count on its first use."""
    start = time.perf_counter()
    plain: list[Tensor] = []
    zeroed: list[Tensor] = []
    i = 0
    if progress is not None and tasks.batches is not None:
        progress(0, tasks.batches)
    while i < (tasks.batches or tasks.max_batches):
        tick = time.perf_counter()
        batch = tasks.batch(i)
        both = torch.stack([algorithm.evaluate(params, batch, algorithm.eval_steps),
                            algorithm.evaluate(zeroed_head(params), batch, algorithm.eval_steps)], 1).detach()
        both, seconds = gather(both, batch, time.perf_counter() - tick)
        plain.append(both[:, 0])
        zeroed.append(both[:, 1])
        if tasks.batches is None:
            tasks.settle(seconds)
        i += 1
        if progress is not None:
            progress(i, tasks.batches)

    def stack(accs: list[Tensor]) -> Tensor:
        return torch.cat(accs).to("cpu", torch.float64)

    return Evaluation(stack(plain), stack(zeroed), headline, time.perf_counter() - start)
