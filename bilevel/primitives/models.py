"""Models: an encoder ``φ_θ`` plus a linear head ``z = W φ + b``, called functionally.

BatchNorm always uses batch statistics (no running buffers), as MAML does. A *layout*
``((groups, size), ...)`` tells every BatchNorm layer how the batch is made of
independent sets: the batch is cut into consecutive segments of ``groups * size``
samples, each viewed as ``[groups, size, ...]``, and statistics are taken per group.
With ``layout=None`` the whole batch is one set. This lets the shared-encoder path
forward the support and query sets of every task in one batch while keeping per-task,
per-set statistics exactly as if each set had been forwarded alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel.primitives.params import Params
from bilevel.primitives.pooling import max_pool2x2
from bilevel.primitives.precision import mixed_op

Layout = Optional[Sequence[tuple[int, int]]]

class SetBatchNorm(nn.Module):
    """BatchNorm with batch statistics computed per set of the layout (biased variance).

    A layout ``[(g, n), …]`` splits the batch into segments of ``g`` sets of ``n`` rows;
    every set is normalised by its own statistics. Each segment runs as one native
    ``batch_norm`` (fused forward, backward and double backward) with its sets folded into
    the channel axis: ``[g·n, C, …] → [n, g·C, …]``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        segments = [(1, x.shape[0])] if layout is None else list(layout)
        parts = x.split([g * n for g, n in segments]) if len(segments) > 1 else (x,)
        outs = [self._normalise(part, groups, size) for (groups, size), part in zip(segments, parts)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _normalise(self, part: Tensor, groups: int, size: int) -> Tensor:
        if groups == 1:
            return F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps)
        rest = part.shape[1:]
        folded = part.reshape(groups, size, *rest).transpose(0, 1).reshape(size, groups * rest[0], *rest[1:])
        normed = F.batch_norm(folded, None, None, self.weight.repeat(groups), self.bias.repeat(groups),
                              True, 0.0, self.eps)
        return normed.reshape(size, groups, *rest).transpose(0, 1).reshape(part.shape)


def _conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """The blocks' 3×3 convolution with padding 1 and no bias."""
    return F.conv2d(x, weight, None, padding=1)


class ConvBlock(nn.Module):
    """conv3×3 → SetBatchNorm → max-pool 2 → ReLU, in the default (``NCHW``) layout.

    Pooling before the ReLU is exact (ReLU is monotone, so ``pool(relu(x)) = relu(pool(x))``,
    gradients included) and rectifies 4× fewer values. On CPU the pool is
    :func:`max_pool2x2` (same values, indices and gradients as ``F.max_pool2d``, faster).
    The layout stays ``NCHW`` everywhere: CPU ``batch_norm`` on channels-last tensors is faster
    but far less accurate in float32 (measurements: ``docs/performance.md``).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = SetBatchNorm(c_out)

    def _convolve(self, x: Tensor) -> Tensor:
        """The convolution. The BatchNorm after it cancels its bias exactly, so the bias's gradient
        is exactly 0; a fused bias's float32 gradient (oneDNN on CPU) is a sequential sum over
        ``N·H·W`` values that leaves noise of ~2e-5 of the meta-gradient's norm. Below float64 the
        bias is therefore added on its own, where autograd's reduction is pairwise (noise ~1e-7);
        float64 keeps the fused kernel (and its bits). Under a mixed-precision policy the
        convolution's derivatives run in 16 bits (:func:`~bilevel.primitives.precision.mixed_op`)."""
        if x.dtype == torch.float64:
            return self.conv(x)
        return mixed_op(_conv3x3, x, self.conv.weight) + self.conv.bias[:, None, None]

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        y = self.norm(self._convolve(x), layout)
        pooled = max_pool2x2(y) if y.device.type == "cpu" else F.max_pool2d(y, 2)
        return F.relu(pooled)


class Conv4(nn.Module):
    """Four conv blocks, flattened: 1×28×28 → 64 (64 ch) or 3×84×84 → 800 (32 ch)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock(in_channels if i == 0 else channels, channels) for i in range(4)])

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        for block in self.blocks:
            x = block(x, layout)
        return x.flatten(1)


class MLP(nn.Module):
    """``Linear → ReLU`` repeated ``layers`` times (no normalisation); the linear layers go through
    :func:`~bilevel.primitives.precision.mixed_op`."""

    def __init__(self, in_features: int, hidden: int, layers: int) -> None:
        super().__init__()
        sizes = [in_features] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(mixed_op(F.linear, x, layer.weight, layer.bias))
        return x


class BilevelModel(nn.Module):
    """``encoder`` + linear ``head`` with ``ways`` outputs; parameters are used functionally."""

    def __init__(self, encoder: nn.Module, feature_dim: int, ways: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, ways)
        self.feature_dim = feature_dim
        self.ways = ways

    def forward(self, x: Tensor) -> Tensor:
        """Logits with the module's own parameters (used by oracles such as ``higher``)."""
        return self.head(self.encoder(x))

    def encode(self, encoder_params: Params, x: Tensor, layout: Layout = None) -> Tensor:
        """``φ_θ(x)``: features ``[n, d]`` for images ``[n, ...]`` (``encoder_params`` un-prefixed)."""
        return functional_call(self.encoder, encoder_params, (x, layout))

    def init_params(self) -> Params:
        """A fresh copy of the module's parameters as a detached dict."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}


@dataclass
class ModelConfig:
    """Model choice. ``channels`` = conv width (default 64 for conv4, 32 for conv4_mini);
    ``hidden``/``layers`` = MLP width and depth."""

    name: str = "conv4"
    channels: Optional[int] = None
    hidden: int = 64
    layers: int = 2


MODELS = ("conv4", "conv4_mini", "mlp")


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], ways: int) -> BilevelModel:
    """Instantiate the model for inputs of ``input_shape`` (without the batch dim)."""
    if cfg.name in ("conv4", "conv4_mini"):
        if len(input_shape) != 3:
            raise ValueError(
                f"model={cfg.name} needs image inputs [C, H, W], got shape {tuple(input_shape)}; "
                "use model=mlp for vector data (data=synthetic)"
            )
        channels = cfg.channels or (64 if cfg.name == "conv4" else 32)
        encoder: nn.Module = Conv4(input_shape[0], channels)
    elif cfg.name == "mlp":
        features = 1
        for s in input_shape:
            features *= s
        encoder = MLP(features, cfg.hidden, cfg.layers)
    else:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    with torch.no_grad():
        feature_dim = encoder(torch.zeros(2, *input_shape)).shape[1]
    return BilevelModel(encoder, feature_dim, ways)
