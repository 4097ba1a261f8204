"""The Omniglot data set read from its original folder layout.

``train`` is ``images_background``; ``val`` and ``test`` split the ``images_evaluation`` alphabets,
sorted by name, into two disjoint halves (``val`` the 1st, 3rd, ... alphabet, ``test`` the 2nd,
4th, ...). Images are inverted so ink is 1 and resized with antialiasing. With ``rotations`` the
90/180/270 degree rotations of every character are added as new classes.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bilevel.data.dataset import check_split, evaluation_half

FOLDERS = {"train": "images_background", "val": "images_evaluation", "test": "images_evaluation"}


def expected_layout(root: Path) -> str:
    """The folder tree this loader expects under ``root``."""
    return (
        f"{root}/\n"
        f"  images_background/<alphabet>/<character>/<drawing>.png\n"
        f"  images_evaluation/<alphabet>/<character>/<drawing>.png"
    )


def _load_png(path: Path, image_size: int) -> np.ndarray:
    image = Image.open(path).convert("L")
    image = Image.fromarray(255 - np.asarray(image))  # ink (black) becomes 255
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.LANCZOS))


@lru_cache(maxsize=4)
def load_folder(folder: Path, image_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """alphabet -> character -> uint8 drawings [n, image_size, image_size] of one split folder (cached)."""
    root = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"no {folder.name} directory in {root}; expected:\n{expected_layout(root)}")
    alphabets = sorted(p for p in folder.iterdir() if p.is_dir())
    if not alphabets:
        raise FileNotFoundError(f"no alphabet directories in {folder}; expected:\n{expected_layout(root)}")
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for alphabet in alphabets:
        characters = sorted(p for p in alphabet.iterdir() if p.is_dir())
        if not characters:
            raise FileNotFoundError(f"no character directories in {alphabet}; expected:\n{expected_layout(root)}")
        loaded[alphabet.name] = {}
        for character in characters:
            drawings = sorted(character.glob("*.png"))
            if not drawings:
                raise FileNotFoundError(f"no .png drawings in {character}; expected:\n{expected_layout(root)}")
            stack = np.stack([_load_png(p, image_size) for p in drawings])
            loaded[alphabet.name][character.name] = torch.from_numpy(stack)
    return loaded


class OmniglotDataset:
    """One Omniglot split; class ``c`` is ``characters[c % n]`` rotated by ``90 * (c // n)`` degrees."""

    def __init__(self, root: str, split: str, image_size: int = 28, rotations: bool = False) -> None:
        check_split(split)
        base = Path(root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"Omniglot directory {base} does not exist; expected:\n{expected_layout(base)}")
        folder = load_folder(base / FOLDERS[split], image_size)
        alphabets = sorted(folder)
        if split != "train":
            if len(alphabets) < 2:
                raise ValueError(
                    f"{base / FOLDERS[split]} has {len(alphabets)} alphabet, but val and test need at least 2 "
                    f"(they are disjoint halves of the evaluation alphabets); add alphabets there"
                )
            alphabets = evaluation_half(alphabets, split)
        self.alphabets = tuple(alphabets)
        self.characters = tuple(f"{a}/{c}" for a in alphabets for c in folder[a])
        drawings = [folder[a][c] for a in alphabets for c in folder[a]]
        counts = torch.tensor([len(d) for d in drawings])
        self._images = torch.cat(drawings)
        self._offsets = torch.cumsum(counts, 0) - counts
        self._rotations = 4 if rotations else 1
        self.num_classes = len(drawings) * self._rotations
        self.samples_per_class = int(counts.min())
        self.image_shape = (1, image_size, image_size)

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] int64, indices [M] int64 -> float32 images [M, 1, side, side], ink 1 on 0."""
        n = len(self.characters)
        images = self._images[self._offsets[classes % n] + indices]
        quarter_turns = classes // n
        for k in range(1, self._rotations):
            turn = quarter_turns == k
            images[turn] = torch.rot90(images[turn], k, dims=(1, 2))
        return images.unsqueeze(1).float().div_(255)
