"""Draws N-way K-shot meta-batches from a :class:`ClassDataset`."""
from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import torch

from bilevel.data.batch import TaskBatch
from bilevel.data.dataset import ClassDataset


def task_seed(seed: int, step: int, task: int) -> int:
    """The seed of task ``task`` of meta-batch ``step``: a 64-bit hash of ``(seed, step, task)``.

    Every task has its own generator, so a task is the same whichever process draws it and
    whatever else is drawn: the meta-batch does not depend on how it is shared out."""
    digest = hashlib.blake2b(f"{seed}/{step}/{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TaskSampler:
    """Deterministic stream of meta-batches of ``meta_batch`` tasks, each ``ways``-way.

    Every task draws ``ways`` distinct classes and, per class, ``shots + queries`` distinct
    samples: the first ``shots`` form the support set, the rest the query set; both are ordered
    class by class (label 0's samples first). Labels are a fresh uniform permutation per task.
    With ``fixed_labels`` a class always gets label ``class % ways`` and each task picks one class
    per residue, so the class-to-label map is the same for the whole run (Kao et al., 2022).
    With ``fixed_blocks`` a task is one of the ``⌊classes / ways⌋`` fixed blocks of ``ways``
    consecutive classes, drawn uniformly (classes past the last whole block are never drawn);
    with ``fixed_labels`` too, class ``c`` keeps label ``c % ways`` (its place in its block),
    without it the block's labels are a fresh permutation per task.

    Task ``i`` of meta-batch ``t`` is drawn from a private ``torch.Generator`` seeded with
    :func:`task_seed` ``(seed, t, i)``: a pure function of those three numbers. So the sampler's
    whole state is ``t``, the number of meta-batches drawn, and a process that draws only the
    tasks ``tasks`` of every meta-batch (its share, :meth:`share`) gets exactly those tasks of
    the meta-batches a single process draws, in the same order.
    """

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int,
        shots: int,
        queries: int,
        meta_batch: int,
        seed: int,
        fixed_labels: bool = False,
        tasks: Optional[range] = None,
        fixed_blocks: bool = False,
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries), ("meta_batch", meta_batch)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}; set data.{name} (or meta_batch) >= 1")
        if ways > dataset.num_classes:
            residues = (
                f" (fixed_labels uses label = class % {ways}, so every residue 0..{ways - 1} needs a class)"
                if fixed_labels
                else ""
            )
            raise ValueError(
                f"{ways}-way tasks need at least {ways} classes, the split has {dataset.num_classes}{residues}; "
                f"lower ways to at most {dataset.num_classes} or use a split/data set with more classes"
            )
        if shots + queries > dataset.samples_per_class:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries} exceeds the "
                f"{dataset.samples_per_class} samples available per class; lower shots or queries so "
                f"that shots + queries <= {dataset.samples_per_class}"
            )
        tasks = range(meta_batch) if tasks is None else tasks
        if tasks.step != 1 or not 0 <= tasks.start <= tasks.stop <= meta_batch:
            raise ValueError(f"tasks must be a contiguous range within range({meta_batch}), got {tasks}")
        self.dataset = dataset
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.meta_batch = meta_batch
        self.seed = seed
        self.fixed_labels = fixed_labels
        self.fixed_blocks = fixed_blocks
        self.tasks = tasks
        self.step = 0

    def _draw_task(self, step: int, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``task`` of meta-batch ``step``: classes ``[ways]`` (entry j gets label j) and
        per class the indices of its ``shots + queries`` samples ``[ways, shots + queries]``."""
        g = torch.Generator().manual_seed(task_seed(self.seed, step, task))
        n, w = self.dataset.num_classes, self.ways
        if self.fixed_blocks:
            block = int(torch.randint(n // w, (1,), generator=g))
            order = torch.arange(w) if self.fixed_labels else torch.rand(w, generator=g).argsort()
            classes = block * w + order
        elif self.fixed_labels:
            residues = torch.arange(w)
            per_residue = (n - residues + w - 1) // w  # classes r, r + ways, ... < n
            pick = (torch.rand(w, generator=g) * per_residue).long()
            classes = residues + w * torch.minimum(pick, per_residue - 1)
        else:  # a uniformly random ordered subset: the first `ways` entries of a random permutation
            classes = torch.rand(n, generator=g).argsort()[:w]
        draws = torch.rand(w, self.dataset.samples_per_class, generator=g)
        return classes, draws.argsort(dim=1)[:, : self.shots + self.queries]

    def draw(self, step: int, tasks: range) -> TaskBatch:
        """Tasks ``tasks`` of meta-batch ``step`` (a pure function of the seed, ``step`` and ``tasks``)."""
        t, w, k, q = len(tasks), self.ways, self.shots, self.queries
        drawn = [self._draw_task(step, i) for i in tasks]
        classes = torch.stack([c for c, _ in drawn]) if drawn else torch.empty(0, w, dtype=torch.int64)
        indices = torch.stack([i for _, i in drawn]) if drawn else torch.empty(0, w, k + q, dtype=torch.int64)
        images = self.dataset.gather(classes.unsqueeze(2).expand(-1, -1, k + q).reshape(-1), indices.reshape(-1))
        images = images.view(t, w, k + q, *images.shape[1:])
        labels = torch.arange(w)
        return TaskBatch(
            support_x=images[:, :, :k].reshape(t, w * k, *images.shape[3:]),
            support_y=labels.repeat_interleave(k).repeat(t, 1),
            query_x=images[:, :, k:].reshape(t, w * q, *images.shape[3:]),
            query_y=labels.repeat_interleave(q).repeat(t, 1),
            classes=classes,
            first_task=tasks.start,
            meta_tasks=self.meta_batch,
        )

    def sample(self) -> TaskBatch:
        """This sampler's tasks of the next meta-batch of the deterministic sequence."""
        batch = self.draw(self.step, self.tasks)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[TaskBatch]:
        """Infinite iterator over :meth:`sample`."""
        while True:
            yield self.sample()

    def share(self, tasks: range) -> "TaskSampler":
        """A sampler at the same position that draws only the tasks ``tasks`` of every meta-batch
        (one process's share: :func:`bilevel.app.distributed.task_share`)."""
        shared = TaskSampler(self.dataset, self.ways, self.shots, self.queries, self.meta_batch, self.seed,
                             self.fixed_labels, tasks, self.fixed_blocks)
        shared.step = self.step
        return shared

    def fork(self, seed: int) -> "TaskSampler":
        """A sampler of the same tasks shape and share over the same data with its own seed
        ``seed``, at the start of its sequence: drawing from it leaves this sampler's sequence
        untouched."""
        return TaskSampler(self.dataset, self.ways, self.shots, self.queries, self.meta_batch, seed,
                           self.fixed_labels, self.tasks, self.fixed_blocks)

    def state_dict(self) -> dict:
        """The position in the sequence (meta-batches drawn), the same for every share;
        :meth:`load_state_dict` resumes the exact sequence from here."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Resume the sequence saved by :meth:`state_dict`."""
        if "step" not in state:
            raise ValueError(
                f"sampler state has keys {sorted(state)}, expected 'step'; pass the dict from "
                "TaskSampler.state_dict() (a checkpoint of a version before per-task seeds holds "
                "'generator': its task sequence cannot be continued; start a new run)"
            )
        self.step = int(state["step"])
