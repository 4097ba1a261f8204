"""DropBlock (Ghiasi et al., 2018) whose masks are one fixed function within a meta-step.

A meta-step forwards the same images many times: each inner step's support pass, the query pass,
the decomposition's passes and, under ``memory=recompute``, every inner step again in the
backward. The meta-gradient, its decomposition and the recomputation are exact only if all these
passes compute one function of the parameters, so a mask cannot be a fresh random draw per
forward. Here a mask is a pseudo-random *function* of the meta-step's key, the image, the layer,
and the channel and position:

    seed[i, c, h, w] = [u(key, image_i, layer, c, h, w) < γ]          (h, w over (H−b+1)×(W−b+1))
    mask_i = 1 − maxpool_b(pad_{b−1}(seed_i))                          (a b×b block of zeros per seed)
    out_i = x_i · mask_i · |mask_i| / Σ mask_i                         (per-sample rescaling)

``u`` is a 32-bit integer hash (:func:`mix32`, Wellons' ``lowbias32``); the image enters through
:func:`image_keys`, a hash of its pixels rounded to multiples of 2⁻¹², so the same image draws the
same mask alone, in its set, in a batch of sets, under ``vmap`` or in a loop, and recomputed;
the rescaling is per sample (DropBlock's whole-batch count would couple the samples of a batch and
depend on how they are batched). ``γ = rate / b² · HW / ((H−b+1)(W−b+1))`` with the block side
``b = min(size, H, W)`` makes the expected dropped share about ``rate`` (MetaOptNet's formula,
without its warm-up schedule). Integer arithmetic stays below 2⁶³ (no overflow).

Masks are drawn only inside :func:`drop_masks` ``(key)``; outside it (evaluation, the cosine
probe, the tests' references unless they enter it) a :class:`DropBlock` is the identity. The
trainer enters ``drop_masks(mask_key(seed, step))`` around each meta-step: new masks every step,
the same ones after a resume.
"""
from __future__ import annotations

import contextlib
import hashlib
from contextvars import ContextVar
from typing import Iterator, Optional, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MASK32 = 0xFFFFFFFF
QUANTUM = 4096
"""Pixels are hashed as ``round(x · QUANTUM)``: an image in float32 and its (exact) float64 copy hash alike."""

_KEY: ContextVar[Optional[int]] = ContextVar("bilevel_dropblock_key", default=None)
Int = TypeVar("Int", int, Tensor)


@contextlib.contextmanager
def drop_masks(key: int) -> Iterator[None]:
    """Within the block every :class:`DropBlock` draws its masks from ``key`` (a 32-bit integer);
    outside any such block DropBlock is the identity."""
    token = _KEY.set(int(key) & MASK32)
    try:
        yield
    finally:
        _KEY.reset(token)


def masking() -> bool:
    """True inside :func:`drop_masks`."""
    return _KEY.get() is not None


def mask_key(seed: int, step: int) -> int:
    """The key of meta-step ``step`` of a run seeded ``seed``: a 32-bit hash of both."""
    digest = hashlib.blake2b(f"dropblock/{seed}/{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _times(x: Int, constant: int) -> Int:
    """``x · constant mod 2³²`` for ``0 <= x < 2³²`` without passing 2⁶³ (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def mix32(x: Int) -> Int:
    """A bijective 32-bit integer hash with full avalanche (``lowbias32``), on ints or int64 tensors
    holding values in ``[0, 2³²)``."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def image_keys(x: Tensor) -> Tensor:
    """``[n]`` int64 keys in ``[0, 2³²)`` of the images ``x`` ``[n, ...]``: a hash of each image's pixels
    rounded to multiples of ``1 / QUANTUM``, each mixed with its position (a function of the image alone)."""
    quantised = torch.round(x.detach() * QUANTUM).to(torch.int64) & MASK32
    position = mix32(torch.arange(quantised[0].numel(), device=x.device).view(quantised.shape[1:]))
    return mix32(mix32((quantised + position) & MASK32).flatten(1).sum(1) & MASK32)


class DropBlock(nn.Module):
    """DropBlock on ``[n, C, H, W]`` features: ``rate`` in ``[0, 1)``, blocks of ``size``, the
    ``layer``-th DropBlock of its encoder (its masks differ from the other layers'). Identity
    outside :func:`drop_masks` or without ``keys`` (module docstring)."""

    def __init__(self, rate: float, size: int, layer: int) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"model.dropblock_rate must be in [0, 1), got {rate!r}")
        if int(size) != size or size < 1:
            raise ValueError(f"model.dropblock_size must be an integer >= 1, got {size!r}")
        self.rate, self.size, self.layer = float(rate), int(size), int(layer)

    def forward(self, x: Tensor, keys: Optional[Tensor]) -> Tensor:
        key = _KEY.get()
        if key is None or keys is None or self.rate == 0.0:
            return x
        mask = self.mask(keys, key, x.shape[1:]).to(x.dtype)
        kept = mask.flatten(1).sum(1).clamp(min=1.0)
        return x * (mask * (mask[0].numel() / kept).view(-1, 1, 1, 1))

    def mask(self, keys: Tensor, key: int, shape: torch.Size) -> Tensor:
        """The ``[n, C, H, W]`` 0/1 mask of images with ``keys`` under the meta-step ``key``."""
        channels, height, width = shape
        side = min(self.size, height, width)
        rows, cols = height - side + 1, width - side + 1
        gamma = min(1.0, self.rate / side**2 * height * width / (rows * cols))
        salt = mix32((key + _times(self.layer + 1, 0x9E3779B9)) & MASK32)
        first = mix32(keys ^ salt).view(-1, 1, 1, 1)
        second = mix32(first ^ 0x5BD1E995)
        index = torch.arange(channels * rows * cols, device=keys.device).view(1, channels, rows, cols)
        draws = mix32(mix32((index + first) & MASK32) ^ second)
        seeds = (draws < round(gamma * 2**32)).to(torch.float32)
        pad = side - 1
        return 1.0 - F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), side, stride=1)
