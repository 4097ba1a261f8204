"""A reduced pool of classes (``data.train_classes``): the same data, fewer classes.

Kao et al. (2022) train on Omniglot for thousands of outer steps, so every training class is
seen hundreds of times. A shorter run reaches the same number of *exposures per class* on a
smaller pool: with ``T`` outer steps of ``B`` tasks of ``N`` classes over ``C`` classes, each
class appears ``T · B · N / C`` times on average, so ``C = T · B · N / E`` classes give ``E``
exposures. The subset is a fixed function of the data seed (not of the run's seed), so every
arm and seed of a study trains on the same classes.
"""
from __future__ import annotations

import torch

from bilevel.data.dataset import ClassDataset


def choose_classes(num_classes: int, keep: int, seed: int) -> torch.Tensor:
    """The ``keep`` class indices (ascending) of a pool of ``num_classes``: the first ``keep`` of a
    uniform random permutation drawn from ``seed``. Raises ``ValueError`` unless
    ``1 <= keep <= num_classes``."""
    if not 1 <= keep <= num_classes:
        raise ValueError(
            f"data.train_classes={keep} must be between 1 and the {num_classes} classes of the train split; "
            f"lower it (or leave it null for the whole split)"
        )
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return order[:keep].sort().values


class ClassSubset:
    """The classes ``classes`` of ``dataset``, renumbered ``0 … len(classes) − 1`` in that order."""

    def __init__(self, dataset: ClassDataset, classes: torch.Tensor) -> None:
        self.dataset = dataset
        self.classes = classes.to(torch.int64)
        self.num_classes = int(self.classes.numel())
        self.samples_per_class = dataset.samples_per_class
        self.image_shape = dataset.image_shape

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] (subset numbering), indices [M] -> the underlying data set's samples."""
        return self.dataset.gather(self.classes[classes], indices)
