"""The ``synthetic`` data set: Gaussian clusters, as vectors or as images.

Vectors (:class:`SyntheticDataset`): clusters around random unit vectors in R^dim. The three
splits are disjoint sets of ``num_classes`` clusters each, all drawn from one generator seeded
with ``seed`` (train uses the first ``num_classes`` means, val the next, test the last).

Images (:class:`SyntheticImages`, ``data.synthetic_channels=C > 0``): class ``c`` of a split has a
mean image ``m_c ~ N(0, I)`` of shape ``C × S × S`` and samples ``m_c + noise · N(0, I)``: every
pixel has the signal-to-noise ratio ``1 / noise`` (a vector cluster of dim ``D`` has
``1 / (noise · √D)`` per coordinate). Nothing is stored: a class's mean and its samples are drawn
from a generator seeded by a hash of ``(seed, split, c)`` when the class is gathered, so memory does
not grow with ``S`` or the number of classes, and a sample is the same in every draw.
"""
from __future__ import annotations

import hashlib

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


class SyntheticImages:
    """``num_classes`` classes of ``SAMPLES_PER_CLASS`` images ``mean + noise * N(0, I)`` of
    ``shape`` ``(C, S, S)``, each class drawn when gathered (module docstring)."""

    def __init__(self, split: str, num_classes: int, shape: tuple[int, int, int], noise: float, seed: int) -> None:
        check_split(split)
        self.split, self.noise, self.seed = split, noise, seed
        self.num_classes = num_classes
        self.samples_per_class = SAMPLES_PER_CLASS
        self.image_shape = tuple(shape)

    def class_samples(self, label: int) -> torch.Tensor:
        """Every sample of class ``label``: float32 ``[SAMPLES_PER_CLASS, *image_shape]``."""
        key = hashlib.blake2b(f"synthetic-images/{self.seed}/{self.split}/{label}".encode(), digest_size=7).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
        mean = torch.randn(self.image_shape, generator=generator)
        return mean + self.noise * torch.randn((SAMPLES_PER_CLASS, *self.image_shape), generator=generator)

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] int64, indices [M] int64 -> float32 images [M, C, S, S] (one draw per
        distinct class)."""
        out = torch.empty((len(classes), *self.image_shape))
        for label in torch.unique(classes).tolist():
            rows = classes == label
            out[rows] = self.class_samples(label)[indices[rows]]
        return out
