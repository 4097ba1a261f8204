"""conv4 the way the paper's code (and most MAML code) writes it, for the baselines.

``torch.nn`` layers in the default ``NCHW`` layout, ``BatchNorm2d`` with batch statistics
(no running buffers), ``ReLU`` before ``MaxPool2d``. Its parameter names match
:class:`bilevel.BilevelModel` and it is loaded with the same values, so a baseline built on it
computes the same meta-gradient as ours (the benchmarks check it); what differs is only how the
layers are executed (see ``bilevel.primitives.models.ConvBlock``). Imported after torch is set up.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call


class PaperBlock(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(conv.out_channels, track_running_stats=False)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(torch.relu(self.norm(self.conv(x))))


class PaperEncoder(nn.Module):
    def __init__(self, blocks) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PaperBlock(b.conv) for b in blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)


class PaperConv4(nn.Module):
    """Same interface as the parts of ``BilevelModel`` the baselines use: ``encoder``,
    ``head``, ``forward`` and ``encode(encoder_params, x)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = PaperEncoder(model.encoder.blocks)
        self.head = nn.Linear(model.head.in_features, model.head.out_features)
        self.load_state_dict(model.state_dict())
        param = next(model.parameters())
        self.to(param.device, param.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def encode(self, encoder_params: dict, x: Tensor) -> Tensor:
        return functional_call(self.encoder, encoder_params, (x,))
