"""Draws N-way K-shot meta-batches from a :class:`ClassDataset`."""
from __future__ import annotations

from typing import Iterator

import torch

from .batch import TaskBatch
from .dataset import ClassDataset


class TaskSampler:
    """Deterministic stream of meta-batches of ``meta_batch`` tasks, each ``ways``-way.

    Every task draws ``ways`` distinct classes and, per class, ``shots + queries`` distinct
    samples: the first ``shots`` form the support set, the rest the query set; both are ordered
    class by class (label 0's samples first). Labels are a fresh uniform permutation per task.
    With ``fixed_labels`` a class always gets label ``class % ways`` and each task picks one class
    per residue, so the class-to-label map is the same for the whole run (Kao et al., 2022).
    All randomness comes from a private ``torch.Generator`` seeded with ``seed``.
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
        self.dataset = dataset
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.meta_batch = meta_batch
        self.fixed_labels = fixed_labels
        self._generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(ways)
        self._support_y = labels.repeat_interleave(shots).expand(meta_batch, -1)
        self._query_y = labels.repeat_interleave(queries).expand(meta_batch, -1)

    def _draw_classes(self) -> torch.Tensor:
        """[T, ways] int64: column j holds the class that gets label j."""
        n, t, g = self.dataset.num_classes, self.meta_batch, self._generator
        if self.fixed_labels:
            residues = torch.arange(self.ways)
            per_residue = (n - residues + self.ways - 1) // self.ways  # classes r, r + ways, ... < n
            pick = (torch.rand(t, self.ways, generator=g) * per_residue).long()
            return residues + self.ways * torch.minimum(pick, per_residue - 1)
        # A uniformly random ordered subset: the first `ways` entries of a random permutation.
        return torch.rand(t, n, generator=g).argsort(dim=1)[:, : self.ways]

    def sample(self) -> TaskBatch:
        """The next meta-batch of the deterministic sequence."""
        t, w, k, q = self.meta_batch, self.ways, self.shots, self.queries
        classes = self._draw_classes()
        draws = torch.rand(t, w, self.dataset.samples_per_class, generator=self._generator)
        indices = draws.argsort(dim=2)[:, :, : k + q]
        images = self.dataset.gather(classes.unsqueeze(2).expand(-1, -1, k + q).reshape(-1), indices.reshape(-1))
        images = images.view(t, w, k + q, *images.shape[1:])
        return TaskBatch(
            support_x=images[:, :, :k].reshape(t, w * k, *images.shape[3:]),
            support_y=self._support_y.clone(),
            query_x=images[:, :, k:].reshape(t, w * q, *images.shape[3:]),
            query_y=self._query_y.clone(),
            classes=classes,
        )

    def __iter__(self) -> Iterator[TaskBatch]:
        """Infinite iterator over :meth:`sample`."""
        while True:
            yield self.sample()

    def fork(self, seed: int) -> "TaskSampler":
        """A sampler of the same tasks shape over the same data with its own generator seeded
        with ``seed``: drawing from it leaves this sampler's sequence untouched."""
        return TaskSampler(self.dataset, self.ways, self.shots, self.queries, self.meta_batch, seed, self.fixed_labels)

    def state_dict(self) -> dict:
        """The generator state; :meth:`load_state_dict` resumes the exact sequence from here."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume the sequence saved by :meth:`state_dict`."""
        if "generator" not in state:
            raise ValueError(
                f"sampler state has keys {sorted(state)}, expected 'generator'; pass the dict from TaskSampler.state_dict()"
            )
        self._generator.set_state(state["generator"])
