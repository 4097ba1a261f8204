"""ResNet-12, the MetaOptNet / R2-D2 backbone, with per-set BatchNorm statistics.

Four residual blocks of widths ``c·(1, 2.5, 5, 10)`` (``c = 64``: 64-160-320-640). A block maps
``x`` to::

    y = lrelu(bn1(conv1(x)));  y = lrelu(bn2(conv2(y)))
    out = lrelu(pool(bn3(conv3(y)) + bn_s(conv_s(x))))

with 3×3 convolutions, a 1×1 shortcut convolution ``conv_s``, leaky ReLU of slope 0.1 and 2×2
max-pooling (pooling before the leaky ReLU is exact: it is strictly increasing, so the argmax
and the gradients are the same, and it rectifies 4× fewer values). Every BatchNorm is a
:class:`~bilevel.primitives.batchnorm.SetBatchNorm` (per-task, per-set statistics through the
layout, as Conv-4's). The convolutions have no bias: the BatchNorm after each one cancels a bias
exactly, and in float32 a fused bias's gradient would be round-off noise rather than the exact 0.
Features: the average over the last block's spatial positions (``pool="avg"``: ``[n, 10c]``, as
learn2learn and LibFewShot) or its flattening (``pool="flatten"``: ``[n, 10c·h·w]``, as MetaOptNet;
16000 for ``c = 64`` at 84×84). Optional DropBlock on the outputs of the last two blocks, as
MetaOptNet's (``dropblock_rate`` > 0, blocks of ``dropblock_size``; off by default): its masks are
a fixed function of the meta-step's key and the image, drawn only inside
:func:`~bilevel.primitives.dropblock.drop_masks`, so every pass of a meta-step sees one function and
evaluation none (:mod:`bilevel.primitives.dropblock`). Each pooling halves the side (rounding
down), so the images must be at least 16×16.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from bilevel.primitives.batchnorm import Layout, SetBatchNorm
from bilevel.primitives.dropblock import DropBlock, image_keys, masking
from bilevel.primitives.pooling import pool2x2

SLOPE = 0.1
WIDTH_FACTORS = (1.0, 2.5, 5.0, 10.0)
POOLS = ("avg", "flatten")
MIN_SIDE = 16
DROPBLOCK_BLOCKS = (2, 3)
"""The blocks (from 0) whose outputs DropBlock masks: the last two, as MetaOptNet."""


def widths(base: int) -> tuple[int, ...]:
    """The four blocks' channels for base width ``base`` (64 → 64, 160, 320, 640)."""
    return tuple(max(1, round(base * f)) for f in WIDTH_FACTORS)


class ResidualBlock(nn.Module):
    """Three 3×3 conv-BatchNorm layers plus a 1×1 conv-BatchNorm shortcut, then pool and leaky ReLU,
    then ``drop`` (a :class:`~bilevel.primitives.dropblock.DropBlock`, or None)."""

    def __init__(self, c_in: int, c_out: int, drop: Optional[DropBlock] = None) -> None:
        super().__init__()
        self.drop = drop
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = SetBatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = SetBatchNorm(c_out)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = SetBatchNorm(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.shortcut_bn = SetBatchNorm(c_out)
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="leaky_relu", a=SLOPE)

    def forward(self, x: Tensor, layout: Layout = None, keys: Optional[Tensor] = None) -> Tensor:
        """The block's output; ``keys``: the images' DropBlock keys (None: no masks)."""
        y = F.leaky_relu(self.bn1(self.conv1(x), layout), SLOPE)
        y = F.leaky_relu(self.bn2(self.conv2(y), layout), SLOPE)
        y = self.bn3(self.conv3(y), layout) + self.shortcut_bn(self.shortcut(x), layout)
        y = F.leaky_relu(pool2x2(y), SLOPE)
        return y if self.drop is None else self.drop(y, keys)


class ResNet12(nn.Module):
    """``[n, C, H, W]`` images → ``[n, 10c]`` (``pool="avg"``) or flattened features (module docstring)."""

    def __init__(self, in_channels: int, base: int = 64, pool: str = "avg", dropblock_rate: float = 0.0,
                 dropblock_size: int = 5) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"model.pool must be one of {', '.join(POOLS)}, got {pool!r}")
        drops = {i: DropBlock(dropblock_rate, dropblock_size, layer) for layer, i in enumerate(DROPBLOCK_BLOCKS)}
        self.dropping = dropblock_rate > 0
        sizes = (in_channels,) + widths(base)
        self.blocks = nn.ModuleList(ResidualBlock(a, b, drops.get(i) if self.dropping else None)
                                    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))
        self.pool = pool

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        keys = image_keys(x) if self.dropping and masking() else None
        for block in self.blocks:
            x = block(x, layout, keys)
        return x.mean((2, 3)) if self.pool == "avg" else x.flatten(1)
