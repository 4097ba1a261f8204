"""The typed ``data`` config group."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from bilevel.validate import AT_LEAST_1, NON_NEGATIVE, Check, Range


MAX_IMAGE_SIZE = 512
"""The largest ``data.image_size``: the glyph pool (20 drawings of 1,577 classes, a byte a pixel)
takes 8.3 GB at 512, and the pool and every activation grow with the square of the side."""


@dataclass
class DataConfig:
    """Which data set to draw tasks from and the task shape (the Hydra ``data`` group).

    ``root``: data directory for omniglot/miniimagenet (required); cache directory for glyphs
    (None -> ``$BILEVEL_CACHE`` or ``~/.cache/bilevel``). ``image_size``: side length for
    glyphs/omniglot, at most ``MAX_IMAGE_SIZE`` (miniimagenet is always 84). ``rotations``:
    omniglot only, add the 90/180/270 degree rotations as new classes. ``synthetic_*``: synthetic only (classes per split, vector
    dimension, cluster std relative to unit-norm means; ``synthetic_channels`` C > 0: images of
    ``C × image_size × image_size`` instead of vectors, per-pixel N(0, 1) means, ``synthetic_dim``
    unused). ``seed``: data generation seed.
    ``train_classes``: train on that many classes of the train split only (a fixed subset chosen
    by ``seed``: :mod:`bilevel.data.subset`; null: all). ``fixed_blocks``: every training task
    is one of the fixed blocks of ``ways`` consecutive classes
    ``{b·ways, …, b·ways + ways − 1}`` (the paper's memorisation protocol); with ``fixed_labels``
    class ``c`` always has label ``c % ways``, without it the block's labels are permuted per task.
    """

    checks: ClassVar[dict[str, Check]] = {
        "ways": Range(low=2), "shots": AT_LEAST_1, "queries": AT_LEAST_1, "image_size": Range(low=1, high=MAX_IMAGE_SIZE),
        "synthetic_classes": Range(low=2), "synthetic_dim": AT_LEAST_1, "synthetic_noise": NON_NEGATIVE,
        "synthetic_channels": NON_NEGATIVE,
        "seed": NON_NEGATIVE, "train_classes": Range(low=2),
    }

    name: str = "glyphs"
    root: Optional[str] = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    fixed_labels: bool = False
    fixed_blocks: bool = False
    train_classes: Optional[int] = None
    image_size: int = 28
    rotations: bool = False
    synthetic_classes: int = 64
    synthetic_dim: int = 16
    synthetic_noise: float = 0.5
    synthetic_channels: int = 0
    seed: int = 0
