"""``max_pool2x2`` is ``F.max_pool2d(x, 2)``: values, argmax, gradients, double backward and
``torch.func`` transforms, bit for bit (odd sizes and ties included)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from bilevel import max_pool2x2


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (5, 2, 28, 28), (4, 6, 3, 3)])
def test_values_and_gradients_equal_native_max_pool(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    native = F.max_pool2d(x, 2)
    ours = max_pool2x2(x)
    assert torch.equal(ours, native)
    cot = torch.randn_like(native)
    (g_native,) = torch.autograd.grad(native, x, cot)
    (g_ours,) = torch.autograd.grad(ours, x, cot)
    assert torch.equal(g_ours, g_native)


def test_ties_pick_the_first_maximum_in_row_major_order():
    """Quantised inputs tie often; the gradient goes where the native kernel sends it."""
    x = torch.randint(0, 3, (4, 5, 6, 6), generator=torch.Generator().manual_seed(1)).double().requires_grad_()
    cot = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    (g_native,) = torch.autograd.grad(F.max_pool2d(x, 2), x, cot)
    (g_ours,) = torch.autograd.grad(max_pool2x2(x), x, cot)
    assert torch.equal(g_ours, g_native)


def test_double_backward_and_gradcheck():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool2x2, (x,))
    assert torch.autograd.gradgradcheck(max_pool2x2, (x,))


def test_torch_func_transforms_agree_with_native():
    x = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64)

    def second_order(pool):
        first = lambda z: (pool(z) ** 3).sum()  # noqa: E731
        return vmap(grad(lambda z: (grad(first)(z) ** 2).sum()))(x)

    assert torch.equal(vmap(max_pool2x2)(x), vmap(lambda z: F.max_pool2d(z, 2))(x))
    assert torch.allclose(second_order(max_pool2x2), second_order(lambda z: F.max_pool2d(z, 2)), rtol=0, atol=1e-12)
