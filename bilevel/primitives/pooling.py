"""2×2 max-pooling with stride 2, computed from four strided views.

``max_pool2x2(x)`` equals ``F.max_pool2d(x, 2)`` exactly: the same values, the same argmax
(the first maximum in row-major order inside each window, as the CPU kernel picks it; odd
trailing rows and columns are dropped) and therefore the same gradient, which is the native
``max_pool2d_with_indices_backward`` with those indices. Double backward and ``torch.func``
transforms (``grad``, ``vjp``, ``vmap``) work through that native op.

Why: on CPU the native ``NCHW`` max-pool forward is not vectorised; three element-wise
``maximum`` of strided views plus the index arithmetic are several times faster, and the layout
stays ``NCHW``, where ``batch_norm`` is accurate (timings: ``docs/performance.md``).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd import Function


@lru_cache(maxsize=64)
def _window_origins(rows: int, cols: int, width: int, device: torch.device) -> Tensor:
    """Flat in-plane index ``2i·W + 2j`` of the top-left element of window ``(i, j)``."""
    origins = torch.arange(rows, device=device)[:, None] * (2 * width) + torch.arange(cols, device=device)[None, :] * 2
    return origins.to(torch.int32)


class _MaxPool2x2(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        rows, cols = height // 2, width // 2
        x = x[..., : 2 * rows, : 2 * cols]
        a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
        c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        right_top = (b > a).to(torch.int32)
        # offset of the argmax in its window: right_top, or width + right_bottom in the lower row
        # (integer arithmetic, cheaper than torch.where)
        offset = (d > c).to(torch.int32).sub_(right_top).add_(width).mul_(bottom > top).add_(right_top)
        indices = offset.add_(_window_origins(rows, cols, width, x.device)).to(torch.int64)
        return torch.maximum(top, bottom), indices

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_indices: Tensor) -> Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


def max_pool2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)`` for ``x`` of shape ``[..., C, H, W]`` (module docstring)."""
    return _MaxPool2x2.apply(x)[0]


def pool2x2(x: Tensor) -> Tensor:
    """2×2 max-pooling with stride 2: :func:`max_pool2x2` on CPU (faster, same result),
    ``F.max_pool2d`` elsewhere."""
    return max_pool2x2(x) if x.device.type == "cpu" else torch.nn.functional.max_pool2d(x, 2)
