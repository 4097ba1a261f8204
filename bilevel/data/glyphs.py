"""The embedded ``glyphs`` data set: an Omniglot-like pool of letters rendered from matplotlib's fonts.

One class per Unicode letter (category L*) that at least two bundled fonts draw, minus modifier,
superscript/subscript and small-capital letters, precomposed diacritic variants, marks whose ink
box is under 30% of the em size, and exact duplicates of an earlier letter's canonical rendering.
Alphabets are Unicode scripts read from the character name; scripts with fewer than 10 letters are
dropped. Each class has 20 drawings: a random covering font plus random affine jitter and stroke
thickness, white ink on black, resampled from 64-pixel canonical renderings (so sizes above 32 are
softer), built once per (version, seed, image_size) and cached on disk as a checked file
(:func:`bilevel.files.save_checked`: format version and SHA-256). A cache file that does not read
back is rebuilt, with a warning that names it; builds run under a lock next to the file, so
concurrent first uses build once and nobody reads a half-written pool.

Splits never divide an alphabet: the evaluation alphabets are the smallest ones, taken in ascending
size while they hold at most 30% of all classes; ``val`` gets the 1st, 3rd, ... of them and
``test`` the 2nd, 4th, ...; ``train`` gets every other (background) alphabet.
"""
from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bilevel.errors import CorruptFileError
from bilevel.files import FileLock, load_checked, save_checked
from bilevel.files import cache_dir as default_cache_dir
from bilevel.data.dataset import check_split, evaluation_half
from bilevel.data.glyph_render import font_files, jitter, letter_coverage, random_affines, render_canonical

VERSION = 2  # names the cache file; bumped when the pool or the file changes (2: checked file)
CACHE_KIND = "glyphs"
CACHE_FORMAT = 1
DRAWINGS_PER_CLASS = 20
MIN_FONTS = 2
MIN_EXTENT = 0.3  # ink box's longer side / font size; smaller glyphs are dots and ticks
MIN_ALPHABET_CLASSES = 10
EVALUATION_FRACTION = 0.3
EXCLUDED_NAME_PARTS = ("MODIFIER", "SUPERSCRIPT", "SUBSCRIPT", "SMALL CAPITAL")
TWO_WORD_SCRIPTS = ("CANADIAN", "OLD")  # 'CANADIAN SYLLABICS', 'OLD ITALIC'


@dataclass(frozen=True)
class GlyphInfo:
    """What a glyphs class is: the letter and the alphabet (Unicode script) it belongs to."""

    character: str
    alphabet: str


def alphabet_of(char: str) -> str:
    """The script of a letter from its Unicode name, e.g. 'GREEK' or 'CANADIAN SYLLABICS'."""
    words = unicodedata.name(char).split()
    return " ".join(words[:2]) if words[0] in TWO_WORD_SCRIPTS else words[0]


def is_base_letter(char: str) -> bool:
    """True for a letter that is not a modifier/sub-/superscript/small capital or precomposed variant."""
    name = unicodedata.name(char, "")
    return (
        unicodedata.category(char).startswith("L")
        and unicodedata.category(char) != "Lm"
        and not unicodedata.decomposition(char)
        and not any(part in name for part in EXCLUDED_NAME_PARTS)
    )


def _select_letters() -> tuple[list[GlyphInfo], list[np.ndarray]]:
    """The classes and, per class, its canonical renderings [n_fonts, side, side] uint8."""
    fonts = font_files()
    infos: list[GlyphInfo] = []
    renders: list[np.ndarray] = []
    seen: set[bytes] = set()
    for code, font_ids in letter_coverage(fonts).items():
        char = chr(code)
        if len(font_ids) < MIN_FONTS or not is_base_letter(char):
            continue
        drawn = [render_canonical(char, fonts[i]) for i in font_ids]
        images = [image for image, extent in drawn if extent >= MIN_EXTENT]
        if len(images) < MIN_FONTS:
            continue
        key = hashlib.sha1(images[0].tobytes()).digest()
        if key in seen:
            continue
        seen.add(key)
        infos.append(GlyphInfo(char, alphabet_of(char)))
        renders.append(np.stack(images))
    sizes = Counter(info.alphabet for info in infos)
    keep = [i for i, info in enumerate(infos) if sizes[info.alphabet] >= MIN_ALPHABET_CLASSES]
    return [infos[i] for i in keep], [renders[i] for i in keep]


def _draw(renders: list[np.ndarray], seed: int, image_size: int) -> torch.Tensor:
    """uint8 [classes, DRAWINGS_PER_CLASS, image_size, image_size] jittered drawings."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.from_numpy(np.concatenate(renders))
    counts = torch.tensor([len(r) for r in renders])
    offsets = torch.cumsum(counts, 0) - counts
    n = len(renders) * DRAWINGS_PER_CLASS
    choice = (torch.rand(len(renders), DRAWINGS_PER_CLASS, generator=generator) * counts[:, None]).long()
    source = (offsets[:, None] + torch.minimum(choice, counts[:, None] - 1)).reshape(-1)
    affines = random_affines(n, generator, image_size)
    thickness = torch.randint(-1, 2, (n,), generator=generator)
    out = torch.empty(n, image_size, image_size, dtype=torch.uint8)
    for start in range(0, n, 4096):
        part = slice(start, start + 4096)
        canonical = bank[source[part]].unsqueeze(1).float() / 255
        out[part] = jitter(canonical, affines[part], thickness[part], image_size)
    return out.view(len(renders), DRAWINGS_PER_CLASS, image_size, image_size)


def build_glyphs(seed: int, image_size: int) -> tuple[torch.Tensor, list[GlyphInfo]]:
    """Render the whole pool: uint8 drawings [classes, 20, image_size, image_size] and class metadata."""
    if image_size < 8:
        raise ValueError(f"glyphs need image_size >= 8 to stay legible, got {image_size}; set data.image_size (default 28)")
    infos, renders = _select_letters()
    return _draw(renders, seed, image_size), infos


def cache_file(cache_dir: Path, seed: int, image_size: int) -> Path:
    """Where the pool for (VERSION, seed, image_size) is cached."""
    return cache_dir / f"glyphs-v{VERSION}-seed{seed}-size{image_size}.pt"


def _read_cache(path: Path) -> tuple[torch.Tensor, tuple[GlyphInfo, ...]]:
    state = load_checked(path, CACHE_KIND, CACHE_FORMAT, weights_only=True)
    infos = tuple(GlyphInfo(chr(c), a) for c, a in zip(state["codepoints"].tolist(), state["alphabets"]))
    return state["images"], infos


def _try_cache(path: Path, warn: bool = True) -> Optional[tuple[torch.Tensor, tuple[GlyphInfo, ...]]]:
    """The cached pool, or None when there is none or it does not read back (with a warning)."""
    try:
        return _read_cache(path)
    except FileNotFoundError:
        return None
    except CorruptFileError as err:
        if warn:
            logging.getLogger(__name__).warning("%s; rebuilding the glyph cache", err)
        return None


def _build_cache(path: Path, seed: int, image_size: int) -> tuple[torch.Tensor, tuple[GlyphInfo, ...]]:
    images, infos = build_glyphs(seed, image_size)
    state = {
        "images": images,
        "codepoints": torch.tensor([ord(info.character) for info in infos]),
        "alphabets": [info.alphabet for info in infos],
    }
    save_checked(state, path, CACHE_KIND, CACHE_FORMAT)
    return images, tuple(infos)


@lru_cache(maxsize=4)
def load_glyphs(cache_dir: Path, seed: int, image_size: int) -> tuple[torch.Tensor, tuple[GlyphInfo, ...]]:
    """The whole pool from the disk cache; built and cached (atomically, under the cache's
    lock) when it is missing or does not read back."""
    path = cache_file(cache_dir, seed, image_size)
    cached = _try_cache(path)
    if cached is None:
        with FileLock(path.with_name(path.name + ".lock")):
            # another process may have built it while we waited for the lock
            cached = _try_cache(path, warn=False) or _build_cache(path, seed, image_size)
    return cached


def split_alphabets(infos: tuple[GlyphInfo, ...]) -> dict[str, list[str]]:
    """Alphabets of each split (see the module docstring for the rule)."""
    sizes = Counter(info.alphabet for info in infos)
    evaluation: list[str] = []
    taken = 0
    for alphabet in sorted(sizes, key=lambda a: (sizes[a], a)):
        if taken + sizes[alphabet] > EVALUATION_FRACTION * len(infos):
            break
        evaluation.append(alphabet)
        taken += sizes[alphabet]
    if len(evaluation) < 2:
        raise RuntimeError(
            f"the fonts give too few small alphabets for disjoint val/test splits (alphabet sizes: {dict(sizes)})"
        )
    background = sorted(set(sizes) - set(evaluation))
    return {"train": background, "val": evaluation_half(evaluation, "val"), "test": evaluation_half(evaluation, "test")}


class GlyphDataset:
    """One split of the glyphs pool; ``info[c]`` describes class ``c``."""

    def __init__(self, images: torch.Tensor, info: tuple[GlyphInfo, ...]) -> None:
        self.images = images
        self.info = info
        self.num_classes = images.shape[0]
        self.samples_per_class = images.shape[1]
        self.image_shape = (1, *images.shape[2:])

    @property
    def alphabets(self) -> tuple[str, ...]:
        """The alphabets in this split, sorted."""
        return tuple(sorted({info.alphabet for info in self.info}))

    def gather(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """classes [M] int64, indices [M] int64 -> float32 images [M, 1, side, side] in [0, 1]."""
        return self.images[classes, indices].unsqueeze(1).float().div_(255)


def glyph_dataset(split: str, seed: int = 0, image_size: int = 28, cache_dir: Optional[str] = None) -> GlyphDataset:
    """The ``split`` ('train', 'val' or 'test') of the glyphs pool, cached under ``cache_dir``."""
    check_split(split)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    images, infos = load_glyphs(root, seed, image_size)
    alphabets = set(split_alphabets(infos)[split])
    keep = [i for i, info in enumerate(infos) if info.alphabet in alphabets]
    return GlyphDataset(images[keep], tuple(infos[i] for i in keep))
