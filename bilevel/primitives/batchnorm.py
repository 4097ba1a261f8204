"""BatchNorm with per-set batch statistics, and the rule that applies it to any encoder.

Every model normalises with the statistics of the set being forwarded — never running
statistics, in ``train()`` and ``eval()`` mode alike — as MAML does: a task's support set and
its query set are each normalised by their own mean and (biased) variance. A *layout*
``((groups, size), ...)`` says how a batch is made of independent sets: the batch is cut into
consecutive segments of ``groups · size`` samples, each viewed as ``[groups, size, ...]``, and
statistics are taken per group. ``layout=None``: the whole batch is one set. This lets the
shared-encoder path forward the support and query sets of every task in one batch while keeping
per-task, per-set statistics exactly as if each set had been forwarded alone.

Built-in encoders pass the layout down explicitly. A user's encoder cannot (its ``forward``
takes only images), so :func:`with_set_statistics` replaces each of its ``torch.nn`` BatchNorm
layers by a :class:`SetBatchNorm` that shares the layer's affine parameters, and
:func:`forwarding_layout` publishes the layout to those layers for the duration of a forward.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Layout = Optional[Sequence[tuple[int, int]]]

_CURRENT_LAYOUT: ContextVar[Layout] = ContextVar("bilevel_layout", default=None)


@contextlib.contextmanager
def forwarding_layout(layout: Layout) -> Iterator[None]:
    """Within the block, a :class:`SetBatchNorm` called without a layout uses ``layout``."""
    token = _CURRENT_LAYOUT.set(layout)
    try:
        yield
    finally:
        _CURRENT_LAYOUT.reset(token)


class SetBatchNorm(nn.Module):
    """BatchNorm with batch statistics computed per set of the layout (biased variance).

    A layout ``[(g, n), …]`` splits the batch into segments of ``g`` sets of ``n`` rows;
    every set is normalised by its own statistics. Each segment runs as one native
    ``batch_norm`` (fused forward, backward and double backward) with its sets folded into
    the channel axis: ``[g·n, C, …] → [n, g·C, …]``. Without an explicit layout, the one of
    the enclosing :func:`forwarding_layout` (None outside one). ``affine=False``: no weight
    and bias.
    """

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.register_parameter("weight", nn.Parameter(torch.ones(channels)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(channels)) if affine else None)

    def forward(self, x: Tensor, layout: Layout = None) -> Tensor:
        layout = _CURRENT_LAYOUT.get() if layout is None else layout
        segments = [(1, x.shape[0])] if layout is None else list(layout)
        parts = x.split([g * n for g, n in segments]) if len(segments) > 1 else (x,)
        outs = [self._normalise(part, groups, size) for (groups, size), part in zip(segments, parts)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _normalise(self, part: Tensor, groups: int, size: int) -> Tensor:
        if groups == 1:
            return F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps)
        rest = part.shape[1:]
        folded = part.reshape(groups, size, *rest).transpose(0, 1).reshape(size, groups * rest[0], *rest[1:])
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        normed = F.batch_norm(folded, None, None, weight, bias, True, 0.0, self.eps)
        return normed.reshape(size, groups, *rest).transpose(0, 1).reshape(part.shape)


def _set_statistics_of(layer: nn.modules.batchnorm._BatchNorm) -> SetBatchNorm:
    """A :class:`SetBatchNorm` holding ``layer``'s own weight and bias objects and its ``eps``."""
    replacement = SetBatchNorm(layer.num_features, layer.eps, affine=False)
    replacement.weight, replacement.bias = layer.weight, layer.bias
    return replacement


def with_set_statistics(encoder: nn.Module) -> nn.Module:
    """``encoder`` with every ``torch.nn`` BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``)
    replaced, in place, by a :class:`SetBatchNorm` with the same parameters and ``eps``; running
    statistics and momentum are dropped (never used). A BatchNorm that is the encoder itself is
    returned replaced. Other normalisations (``LayerNorm``, ``GroupNorm``, ``InstanceNorm``) are
    per sample and stay as they are."""
    if isinstance(encoder, nn.modules.batchnorm._BatchNorm):
        return _set_statistics_of(encoder)
    for name, child in list(encoder.named_children()):
        setattr(encoder, name, with_set_statistics(child))
    return encoder

