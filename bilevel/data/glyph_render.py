"""Font discovery, canonical glyph rendering and vectorised affine jitter for the glyphs data set."""
from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

CANONICAL_SIDE = 64  # side of the canonical rendering every drawing is resampled from
FONT_SIZE = 96  # pixel size at which a glyph is rasterised before normalisation
FILL = 0.8  # the longer side of a glyph's ink box, as a fraction of the canvas side

# Placeholder (LastResort), size-variant/extension symbol fonts, and the two-glyph Display faces.
EXCLUDED_FONT_PREFIXES = ("LastResortHE", "STIXSiz", "STIXNonUni", "cmex", "cmsy", "DejaVuSansDisplay", "DejaVuSerifDisplay")


def font_files() -> list[Path]:
    """The TTF fonts shipped with matplotlib that can draw letters, sorted by file name."""
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(p for p in font_dir.glob("*.ttf") if not p.name.startswith(EXCLUDED_FONT_PREFIXES))
    if not fonts:
        raise FileNotFoundError(f"no usable .ttf fonts in {font_dir}; the glyphs data set needs matplotlib's bundled fonts")
    return fonts


def letter_coverage(fonts: list[Path]) -> dict[int, list[int]]:
    """Codepoint of every letter (Unicode category L*) -> indices into ``fonts`` whose cmap has it."""
    coverage: dict[int, list[int]] = {}
    for i, path in enumerate(fonts):
        for code in FT2Font(str(path)).get_charmap():
            if code < 0x110000 and unicodedata.category(chr(code)).startswith("L"):
                coverage.setdefault(code, []).append(i)
    return {code: coverage[code] for code in sorted(coverage)}


@lru_cache(maxsize=None)
def _pil_font(path: Path) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), FONT_SIZE)


def render_canonical(char: str, font: Path) -> tuple[np.ndarray, float]:
    """The glyph as uint8 [CANONICAL_SIDE, CANONICAL_SIDE], ink 255 on 0, its ink box scaled to FILL
    and centred; and the ink box's longer side as a fraction of the font size (0 without ink)."""
    canvas = Image.new("L", (3 * FONT_SIZE, 3 * FONT_SIZE))  # room for glyphs far outside the em box
    centre = (3 * FONT_SIZE // 2, 3 * FONT_SIZE // 2)
    ImageDraw.Draw(canvas).text(centre, char, fill=255, font=_pil_font(font), anchor="mm")
    out = Image.new("L", (CANONICAL_SIDE, CANONICAL_SIDE))
    box = canvas.getbbox()
    if box is None:
        return np.asarray(out), 0.0
    glyph = canvas.crop(box)
    extent = max(glyph.size) / FONT_SIZE
    scale = FILL * CANONICAL_SIDE / max(glyph.size)
    size = (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale)))
    glyph = glyph.resize(size, Image.Resampling.BILINEAR)
    out.paste(glyph, ((CANONICAL_SIDE - size[0]) // 2, (CANONICAL_SIDE - size[1]) // 2))
    return np.asarray(out), extent


def random_affines(n: int, generator: torch.Generator, image_size: int) -> torch.Tensor:
    """[n, 2, 3] sampling matrices for ``affine_grid``: rotation +-10 deg, scale 0.85-1.15,
    shear +-0.15 and translation +-2 output pixels."""
    u = torch.rand(n, 5, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = torch.deg2rad(10 * u[:, 0])
    scale = 1 + 0.15 * u[:, 1]
    shear = 0.15 * u[:, 2]
    shift = u[:, 3:] * 2 * (2 / image_size)  # 2 pixels in normalised [-1, 1] coordinates
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shearing = torch.eye(2).repeat(n, 1, 1)
    shearing[:, 0, 1] = shear
    forward = rotation @ shearing * scale[:, None, None]  # maps glyph coordinates to output coordinates
    inverse = torch.linalg.inv(forward)
    return torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)


def _sampling_grid(affines: torch.Tensor, side: int) -> torch.Tensor:
    """Same as ``F.affine_grid(affines, [n, 1, side, side], align_corners=False)``, several times faster on CPU."""
    centres = (torch.arange(side) * 2 + 1) / side - 1
    base = torch.stack([centres.repeat(side), centres.repeat_interleave(side), torch.ones(side * side)], dim=1)
    return (base @ affines.transpose(1, 2)).view(-1, side, side, 2)


def _max3x3(images: torch.Tensor) -> torch.Tensor:
    """3x3 max filter of non-negative ``[n, 1, h, w]`` images (zero outside), separable."""
    p = F.pad(images, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def jitter(
    canonical: torch.Tensor, affines: torch.Tensor, thickness: torch.Tensor, image_size: int
) -> torch.Tensor:
    """Warp float canonical glyphs ``[n, 1, s, s]`` in [0, 1] by ``affines`` ``[n, 2, 3]``, thicken
    (``thickness`` +1), thin (-1) or keep (0) the strokes, and return uint8 ``[n, image_size, image_size]``.

    Warping happens at twice the output resolution, then 2x2 average pooling antialiases.
    """
    grid = _sampling_grid(affines, 2 * image_size)
    warped = F.grid_sample(canonical, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thick, thin = thickness > 0, thickness < 0
    warped[thick] = _max3x3(warped[thick])
    warped[thin] = 1 - _max3x3(1 - warped[thin])
    small = F.avg_pool2d(warped, 2)
    return (small.squeeze(1) * 255).round().clamp(0, 255).to(torch.uint8)
