"""The meta-batch container handed from the samplers to the algorithms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of ``T`` tasks that all share the same shapes.

    ``support_x``/``query_x`` are float ``[T, n, *image_shape]``; ``support_y``/``query_y`` are
    int64 ``[T, n]`` labels in ``0..ways-1``, ordered class by class; ``classes[t, j]`` is the
    dataset class index that got label ``j`` in task ``t``.

    A batch may be one process's share of a meta-batch: tasks ``first_task … first_task + T − 1``
    of a meta-batch of ``meta_tasks`` tasks (None: the batch is the whole meta-batch). An
    algorithm that draws per-task randomness draws it for the whole meta-batch and takes the
    share's rows (:func:`task_position`), so the draws do not depend on how tasks are shared out.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    first_task: int = 0
    meta_tasks: Optional[int] = None

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``T``."""
        return self.support_x.shape[0]

    @property
    def ways(self) -> int:
        """Number of classes per task."""
        return self.classes.shape[1]

    def to(
        self,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "TaskBatch":
        """Move every tensor to ``device``; ``dtype`` converts only the float inputs ``*_x``."""
        return TaskBatch(
            support_x=self.support_x.to(device=device, dtype=dtype),
            support_y=self.support_y.to(device=device),
            query_x=self.query_x.to(device=device, dtype=dtype),
            query_y=self.query_y.to(device=device),
            classes=self.classes.to(device=device),
            first_task=self.first_task,
            meta_tasks=self.meta_tasks,
        )

    def task(self, i: int) -> "TaskBatch":
        """The ``i``-th task (negative ``i`` counts from the end) as a batch of one task (a whole
        meta-batch of its own)."""
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(f"task index {i} is out of range for a batch of {self.num_tasks} tasks")
        i %= self.num_tasks
        pick = slice(i, i + 1)
        return TaskBatch(
            support_x=self.support_x[pick],
            support_y=self.support_y[pick],
            query_x=self.query_x[pick],
            query_y=self.query_y[pick],
            classes=self.classes[pick],
        )


def task_position(batch: Any) -> tuple[int, int]:
    """``(first task, tasks in the meta-batch)`` of ``batch``: a :class:`TaskBatch` share says
    where it lies; any other batch (duck-typed, e.g. in tests) is a whole meta-batch."""
    tasks = batch.support_y.shape[0]
    return getattr(batch, "first_task", 0), getattr(batch, "meta_tasks", None) or tasks
