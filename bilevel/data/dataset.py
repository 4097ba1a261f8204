"""What a labelled pool of classes provides, and the split names every data set accepts."""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import torch

SPLITS = ("train", "val", "test")

T = TypeVar("T")


class ClassDataset(Protocol):
    """A labelled pool of classes from which few-shot tasks are drawn.

    ``samples_per_class`` is the minimum over classes: every class has at least that many samples.
    """

    num_classes: int
    samples_per_class: int
    image_shape: tuple[int, ...]

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] int64, indices [M] int64 -> float32 images [M, *image_shape]."""
        ...


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def evaluation_half(alphabets: Sequence[T], split: str) -> list[T]:
    """The evaluation alphabets of ``split``: ``val`` gets positions 0, 2, 4, ..., ``test`` 1, 3, 5, ...

    Alternating keeps both halves disjoint and similar in size when ``alphabets`` is sorted.
    """
    if split not in ("val", "test"):
        raise ValueError(f"evaluation alphabets are split into 'val' and 'test', not {split!r}")
    return list(alphabets[0 if split == "val" else 1 :: 2])
