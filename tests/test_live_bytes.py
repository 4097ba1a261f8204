"""``benchmarks/live_bytes.py``: the live-tensor-bytes counter behind ``memory.py --live``
counts each storage once, frees it when the storage dies, and sees inside ``vmap`` and the
backward."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from live_bytes import LiveTensorBytes  # noqa: E402


def test_storages_are_counted_once_and_released_when_freed() -> None:
    made_before = torch.ones(500)
    with LiveTensorBytes() as live:
        made_before[:10].add_(1)  # a view of a storage made before: no new memory
        assert live.current == 0
        a = torch.ones(1000)
        view = a[:10]
        a.add_(1)
        b = a * 2
        assert live.current == live.peak == 8000
        del b
        assert live.current == 4000 and live.peak == 8000
    assert view.sum() == 20


def test_the_backward_and_vmap_are_seen() -> None:
    x = torch.randn(256, requires_grad=True)
    with LiveTensorBytes() as live:
        (x.exp() * x).sum().backward()
    assert live.current == 256 * 4  # x.grad, made in the backward, survives it
    assert live.peak >= 3 * 256 * 4  # exp(x), the product and a gradient buffer at once
    weights = torch.randn(8, 64, 64)
    with LiveTensorBytes() as live:
        out = torch.vmap(lambda w: w @ w)(weights)
    assert live.current == out.numel() * 4 == 8 * 64 * 64 * 4  # the batched result, one storage
