"""Models: an encoder ``φ_θ`` plus a linear head ``z = W φ + b``, called functionally.

Built-in encoders: ``conv4`` / ``conv4_mini`` (:class:`Conv4`), ``resnet12``
(:mod:`bilevel.primitives.resnet12`) and ``mlp``; ``custom`` instantiates any ``nn.Module``
named by its import path (:mod:`bilevel.primitives.custom`). Every BatchNorm uses the
statistics of the set being forwarded, per task and per set, never running statistics
(:mod:`bilevel.primitives.batchnorm`: the layout, and the rule for a user's encoder).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel.primitives.batchnorm import Layout, SetBatchNorm, forwarding_layout, with_set_statistics
from bilevel.primitives.custom import import_encoder
from bilevel.primitives.params import Params
from bilevel.primitives.pooling import pool2x2
from bilevel.primitives.precision import mixed_op
from bilevel.primitives.resnet12 import MIN_SIDE, ResNet12


def _conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """The blocks' 3×3 convolution with padding 1 and no bias."""
    return F.conv2d(x, weight, None, padding=1)


class ConvBlock(nn.Module):
    """conv3×3 → SetBatchNorm → max-pool 2 → ReLU, in the default (``NCHW``) layout.

    Pooling before the ReLU is exact (ReLU is monotone, so ``pool(relu(x)) = relu(pool(x))``,
    gradients included) and rectifies 4× fewer values. On CPU the pool is
    :func:`~bilevel.primitives.pooling.max_pool2x2` (same values, indices and gradients as ``F.max_pool2d``, faster).
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
        return F.relu(pool2x2(self.norm(self._convolve(x), layout)))


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
    """``encoder`` + linear ``head`` with ``ways`` outputs; parameters are used functionally.

    ``encoder``: any ``nn.Module`` mapping a batch of inputs ``[n, ...]`` to features
    ``[n, feature_dim]``. Its ``torch.nn`` BatchNorm layers are replaced in place by per-set
    BatchNorm (:func:`~bilevel.primitives.batchnorm.with_set_statistics`), and the model is put in
    ``eval()`` mode, so that stochastic layers such as dropout are off: a meta-gradient is a
    deterministic function of the parameters and the batch (BatchNorm ignores the mode). An
    encoder whose ``forward`` takes a ``layout`` argument receives the layout; any other gets it
    through :func:`~bilevel.primitives.batchnorm.forwarding_layout`. :meth:`from_encoder` finds
    ``feature_dim`` by one dry forward.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, ways: int) -> None:
        super().__init__()
        self.encoder = with_set_statistics(encoder)
        self.head = nn.Linear(feature_dim, ways)
        self.feature_dim = feature_dim
        self.ways = ways
        self.takes_layout = "layout" in inspect.signature(self.encoder.forward).parameters
        self.eval()

    @classmethod
    def from_encoder(cls, encoder: nn.Module, input_shape: tuple[int, ...], ways: int) -> "BilevelModel":
        """The model on ``encoder`` for inputs of ``input_shape`` (without the batch dim), its
        feature size found by one dry forward (:func:`feature_size`)."""
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"the encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        encoder = with_set_statistics(encoder).eval()
        return cls(encoder, feature_size(encoder, input_shape), ways)

    def forward(self, x: Tensor) -> Tensor:
        """Logits with the module's own parameters (used by oracles such as ``higher``)."""
        return self.head(self.encoder(x))

    def encode(self, encoder_params: Params, x: Tensor, layout: Layout = None) -> Tensor:
        """``φ_θ(x)``: features ``[n, d]`` for inputs ``[n, ...]`` (``encoder_params`` un-prefixed),
        BatchNorm statistics per set of ``layout`` (None: the whole batch is one set)."""
        if self.takes_layout:
            return functional_call(self.encoder, encoder_params, (x, layout))
        with forwarding_layout(layout):
            return functional_call(self.encoder, encoder_params, (x,))

    def init_params(self) -> Params:
        """A fresh copy of the module's parameters as a detached dict."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}


def feature_size(encoder: nn.Module, input_shape: tuple[int, ...]) -> int:
    """``d`` of the encoder's ``[n, d]`` output, from one dry forward of two zero inputs."""
    parameter = next(encoder.parameters(), None)
    probe = torch.zeros(2, *input_shape, dtype=torch.get_default_dtype() if parameter is None else parameter.dtype)
    try:
        with torch.no_grad():
            out = encoder(probe)
    except Exception as err:
        raise ValueError(f"the encoder {type(encoder).__name__} failed on a dry forward of inputs of shape "
                         f"{tuple(input_shape)}: {type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the encoder {type(encoder).__name__} must map inputs [n, {', '.join(map(str, input_shape))}] "
                         f"to features [n, d], but gave {got} for n=2; end it with nn.Flatten() or a pooling to [n, d]")
    return out.shape[1]


@dataclass
class ModelConfig:
    """Model choice. ``channels``: conv width (default 64 for conv4, 32 for conv4_mini) or ResNet-12
    base width ``c`` (blocks ``c``, ``2.5c``, ``5c``, ``10c``; default 64); ``pool``: ResNet-12's
    features, ``avg`` or ``flatten``; ``dropblock_rate``/``dropblock_size``: ResNet-12's DropBlock on its
    last two blocks (rate in ``[0, 1)``, 0: off; :mod:`bilevel.primitives.dropblock`); ``hidden``/``layers``:
    MLP width and depth; ``target``/``kwargs``:
    the ``custom`` encoder, ``target(**kwargs)`` for an import path ``package.module.Class`` (``kwargs``: a
    mapping, or None for none; typed ``Any`` so that ``model.kwargs={...}`` replaces it on the command line)."""

    name: str = "conv4"
    channels: Optional[int] = None
    hidden: int = 64
    layers: int = 2
    pool: str = "avg"
    dropblock_rate: float = 0.0
    dropblock_size: int = 5
    target: Optional[str] = None
    kwargs: Any = None


MODELS = ("conv4", "conv4_mini", "resnet12", "mlp", "custom")
IMAGE_MODELS = {"conv4": 64, "conv4_mini": 32, "resnet12": 64}
"""Image encoders and their default width."""


def _image_encoder(cfg: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """Conv-4 or ResNet-12 for image inputs ``[C, H, W]`` of at least ``MIN_SIDE`` pixels a side
    (four 2×2 poolings)."""
    if len(input_shape) != 3:
        raise ValueError(
            f"model={cfg.name} needs image inputs [C, H, W], got shape {tuple(input_shape)}; "
            "use model=mlp for vector data (data=synthetic)"
        )
    if min(input_shape[1:]) < MIN_SIDE:
        raise ValueError(
            f"model={cfg.name} halves the image side four times, so images must be at least {MIN_SIDE}x{MIN_SIDE}; "
            f"got {input_shape[1]}x{input_shape[2]}: set data.image_size >= {MIN_SIDE}"
        )
    channels = cfg.channels or IMAGE_MODELS[cfg.name]
    if cfg.name == "resnet12":
        return ResNet12(input_shape[0], channels, cfg.pool, cfg.dropblock_rate, cfg.dropblock_size)
    return Conv4(input_shape[0], channels)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], ways: int) -> BilevelModel:
    """Instantiate the model for inputs of ``input_shape`` (without the batch dim)."""
    if cfg.name != "resnet12" and cfg.dropblock_rate:
        raise ValueError(f"model.dropblock_rate applies to model=resnet12 only, got {cfg.dropblock_rate!r} with "
                         f"model={cfg.name}; remove it or use model=resnet12")
    if cfg.name in IMAGE_MODELS:
        encoder = _image_encoder(cfg, input_shape)
    elif cfg.name == "mlp":
        features = 1
        for s in input_shape:
            features *= s
        encoder = MLP(features, cfg.hidden, cfg.layers)
    elif cfg.name == "custom":
        encoder = import_encoder(cfg.target, cfg.kwargs)
    else:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    return BilevelModel.from_encoder(encoder, tuple(input_shape), ways)
