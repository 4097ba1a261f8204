"""The ``synthetic`` data set: Gaussian clusters around random unit vectors in R^dim.

The three splits are disjoint sets of ``num_classes`` clusters each, all drawn from one generator
seeded with ``seed`` (train uses the first ``num_classes`` means, val the next, test the last).
"""
from __future__ import annotations

import torch

from bilevel.data.dataset import SPLITS, check_split

SAMPLES_PER_CLASS = 40


class SyntheticDataset:
    """``num_classes`` clusters with ``SAMPLES_PER_CLASS`` samples ``mean + noise * N(0, I)`` each."""

    def __init__(self, split: str, num_classes: int = 64, dim: int = 16, noise: float = 0.5, seed: int = 0) -> None:
        check_split(split)
        if num_classes < 1 or dim < 1 or noise < 0:
            raise ValueError(
                f"synthetic data needs synthetic_classes >= 1, synthetic_dim >= 1 and synthetic_noise >= 0, "
                f"got {num_classes}, {dim} and {noise}"
            )
        generator = torch.Generator().manual_seed(seed)
        means = torch.randn(len(SPLITS) * num_classes, dim, generator=generator)
        means = means / means.norm(dim=1, keepdim=True)
        noise_draws = torch.randn(len(SPLITS) * num_classes, SAMPLES_PER_CLASS, dim, generator=generator)
        part = slice(SPLITS.index(split) * num_classes, (SPLITS.index(split) + 1) * num_classes)
        self.means = means[part]
        self.samples = self.means[:, None, :] + noise * noise_draws[part]
        self.num_classes = num_classes
        self.samples_per_class = SAMPLES_PER_CLASS
        self.image_shape = (dim,)

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] int64, indices [M] int64 -> float32 vectors [M, dim]."""
        return self.samples[classes, indices]
