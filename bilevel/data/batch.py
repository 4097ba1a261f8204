"""The meta-batch container handed from the samplers to the algorithms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of ``T`` tasks that all share the same shapes.

    ``support_x``/``query_x`` are float ``[T, n, *image_shape]``; ``support_y``/``query_y`` are
    int64 ``[T, n]`` labels in ``0..ways-1``, ordered class by class; ``classes[t, j]`` is the
    dataset class index that got label ``j`` in task ``t``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

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
        )

    def task(self, i: int) -> "TaskBatch":
        """The ``i``-th task (negative ``i`` counts from the end) as a batch of one task."""
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
