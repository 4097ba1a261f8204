"""mini-ImageNet with the Ravi & Larochelle (2017) class split, decoding images on demand."""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bilevel.data.dataset import check_split

SIDE = 84
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def expected_layout(root: Path) -> str:
    """The files this loader expects under ``root``."""
    return (
        f"{root}/\n"
        f"  train.csv, val.csv, test.csv   (header: filename,label)\n"
        f"  images/<filename>              (JPEG or PNG, resized to {SIDE}x{SIDE})"
    )


@lru_cache(maxsize=8192)
def load_image(path: Path) -> torch.Tensor:
    """uint8 [3, 84, 84] RGB image (resized if needed), cached."""
    image = Image.open(path).convert("RGB")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _read_split(root: Path, split: str) -> dict[str, list[str]]:
    """label -> filenames, from ``root/<split>.csv``."""
    path = root / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no {split}.csv in {root}; expected:\n{expected_layout(root)}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        header = ",".join(rows[0]) if rows else "(empty file)"
        raise ValueError(f"{path} must start with the header 'filename,label', found {header!r}")
    files: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"{path} line {line} has {len(row)} fields {row}, expected 'filename,label'")
        files.setdefault(row[1].strip(), []).append(row[0].strip())
    if not files:
        raise ValueError(f"{path} lists no images; add 'filename,label' rows")
    return files


class MiniImageNetDataset:
    """One split of mini-ImageNet; classes are the CSV labels in sorted order."""

    def __init__(self, root: str, split: str) -> None:
        check_split(split)
        base = Path(root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"mini-ImageNet directory {base} does not exist; expected:\n{expected_layout(base)}")
        files = _read_split(base, split)
        images = base / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"no images directory in {base}; expected:\n{expected_layout(base)}")
        present = {p.name for p in images.iterdir()}
        missing = [name for names in files.values() for name in names if name not in present]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in {split}.csv are not in {images}, e.g. {missing[:3]}; "
                f"expected:\n{expected_layout(base)}"
            )
        self.labels = tuple(sorted(files))
        self._paths = [[images / name for name in files[label]] for label in self.labels]
        self.num_classes = len(self.labels)
        self.samples_per_class = min(len(p) for p in self._paths)
        self.image_shape = (3, SIDE, SIDE)

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] int64, indices [M] int64 -> float32 images [M, 3, 84, 84], ImageNet-normalised."""
        raw = torch.stack([load_image(self._paths[c][i]) for c, i in zip(classes.tolist(), indices.tolist())])
        return (raw.float() / 255 - MEAN) / STD
