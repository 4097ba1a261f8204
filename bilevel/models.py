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

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from .params import Params

Layout = Optional[Sequence[tuple[int, int]]]

_CHANNELS_LAST: ContextVar[bool] = ContextVar("bilevel_channels_last", default=False)


@contextmanager
def channels_last_activations(enabled: bool = True) -> Iterator[None]:
    """Within this block, conv activations of models built with ``channels_last=True`` are
    laid out channels-last on CPU (see :class:`ConvBlock`). The engine enables it where it
    is safe and measured faster: per-task loops whose backward is not ``vmap``-ped (torch
    has no channels-last rules under ``vmap``: a batched VJP through such a graph fails)."""
    token = _CHANNELS_LAST.set(enabled)
    try:
        yield
    finally:
        _CHANNELS_LAST.reset(token)


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


class ConvBlock(nn.Module):
    """conv3×3 → SetBatchNorm → max-pool 2 → ReLU.

    Pooling before the ReLU is exact (ReLU is monotone, so ``pool(relu(x)) = relu(pool(x))``,
    gradients included) and rectifies 4× fewer values. With ``channels_last``, inside
    :func:`channels_last_activations`, a single set (``layout=None``) on CPU has its conv
    output laid out channels-last (``NHWC`` strides, by permutes; same values): CPU BatchNorm
    and max-pool kernels are vectorised over channels in that layout (max-pool 2×2 of
    75×64×28×28: 23 ms → 1.6 ms on one core here).
    """

    def __init__(self, c_in: int, c_out: int, channels_last: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = SetBatchNorm(c_out)
        self.channels_last = channels_last

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        y = self.conv(x)
        if self.channels_last and layout is None and y.device.type == "cpu" and _CHANNELS_LAST.get():
            y = y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return F.relu(F.max_pool2d(self.norm(y, layout), 2))


class Conv4(nn.Module):
    """Four conv blocks, flattened: 1×28×28 → 64 (64 ch) or 3×84×84 → 800 (32 ch)."""

    def __init__(self, in_channels: int, channels: int, channels_last: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [ConvBlock(in_channels if i == 0 else channels, channels, channels_last) for i in range(4)]
        )

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        for block in self.blocks:
            x = block(x, layout)
        return x.flatten(1)


class MLP(nn.Module):
    """``Linear → ReLU`` repeated ``layers`` times (no normalisation)."""

    def __init__(self, in_features: int, hidden: int, layers: int) -> None:
        super().__init__()
        sizes = [in_features] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
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
    ``hidden``/``layers`` = MLP width and depth; ``channels_last`` = let the engine lay conv
    activations out channels-last where it is safe (CPU per-task loops; same values, faster:
    see ``docs/performance.md``)."""

    name: str = "conv4"
    channels: Optional[int] = None
    hidden: int = 64
    layers: int = 2
    channels_last: bool = True


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
        encoder: nn.Module = Conv4(input_shape[0], channels, cfg.channels_last)
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
