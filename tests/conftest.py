"""Shared fixtures of the engine's correctness tests.

* ``make_problem``: a tiny seeded model (``mlp`` hidden 8 on 4-d inputs, or ``conv4`` with
  4 channels on 1×16×16 images), its parameters (random head, or the zeroing trick
  ``W = b = 0``) and a Gaussian few-shot batch whose labels are laid out class by class.
* ``reference``: an independent plain-autograd MAML — ``model(x) = head(encoder(x))`` through
  ``functional_call``, ``F.cross_entropy`` and ``torch.autograd.grad`` (``create_graph`` for
  second order), support and query forwarded separately (BatchNorm batch statistics). It
  shares nothing with the engine but the model definition, so engine gradients are
  checked against it, and it is itself checked against finite differences.
* ``rel_err``: ``‖a − b‖ / ‖b‖`` over every leaf of two parameter dicts, as a float.
* ``single_thread``: run a test with one intra-op thread (restored afterwards). On a shared,
  oversubscribed CPU the tiny kernels here are ~50× faster that way than with spinning
  OpenMP workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel import BilevelModel, ModelConfig, build_algorithm, build_model
from bilevel.params import Params

INPUT_SHAPES = {"mlp": (4,), "conv4": (1, 16, 16)}
INNER_LR = 0.4


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Batch:
    """``T`` tasks: ``support_x [T, N·K, ...]``, ``support_y [T, N·K]`` (class by class), same for query."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@dataclass(frozen=True)
class Problem:
    model: BilevelModel
    params: Params
    batch: Batch
    ways: int
    inner_lr: float = INNER_LR

    def algorithm(self, **config):
        """The registered MAML plugin on this model, with this problem's ``inner_lr``."""
        return build_algorithm({"name": "maml", "inner_lr": self.inner_lr, **config}, self.model)


def _make_problem(
    name: str = "mlp",
    *,
    dtype: torch.dtype = torch.float64,
    ways: int = 3,
    shots: int = 1,
    queries: int = 2,
    tasks: int = 2,
    head: str = "random",
    seed: int = 0,
) -> Problem:
    """A seeded tiny problem; ``head="zero"`` sets ``W = b = 0`` (the zeroing trick)."""
    if head not in ("random", "zero"):
        raise ValueError(f"head must be 'random' or 'zero', got {head!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = INPUT_SHAPES[name]
    model = build_model(ModelConfig(name=name, hidden=8, channels=4), shape, ways).to(dtype)
    params = model.init_params()
    if head == "zero":
        params["head.weight"] = torch.zeros_like(params["head.weight"])
        params["head.bias"] = torch.zeros_like(params["head.bias"])

    def labels(per_class: int) -> Tensor:
        return torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)

    batch = Batch(
        support_x=torch.randn(tasks, ways * shots, *shape, generator=gen, dtype=dtype),
        support_y=labels(shots),
        query_x=torch.randn(tasks, ways * queries, *shape, generator=gen, dtype=dtype),
        query_y=labels(queries),
    )
    return Problem(model, params, batch, ways)


@pytest.fixture
def make_problem() -> Callable[..., Problem]:
    return _make_problem


def _adapted_keys(params: Params, adapt: str) -> list[str]:
    return [k for k in params if adapt == "all" or k.startswith("head.")]


def reference_adapt(
    model: BilevelModel, params: Params, x: Tensor, y: Tensor, *, steps: int, lr: float,
    adapt: str, first_order: bool,
) -> Params:
    """``θ_{t+1} = θ_t − α ∇ L_S(θ_t)`` over the adapted keys, by ``torch.autograd.grad``;
    first order computes the inner gradients without a graph (constants)."""
    keys = _adapted_keys(params, adapt)
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
        fast.update({k: fast[k] - lr * g for k, g in zip(keys, grads)})
    return fast


def reference_meta_loss(
    model: BilevelModel, params: Params, batch: Batch, *, steps: int, lr: float, adapt: str,
    first_order: bool = False,
) -> Tensor:
    """Mean over tasks of the query cross-entropy after the inner loop."""
    losses = []
    for i in range(batch.support_y.shape[0]):
        fast = reference_adapt(
            model, params, batch.support_x[i], batch.support_y[i],
            steps=steps, lr=lr, adapt=adapt, first_order=first_order,
        )
        losses.append(F.cross_entropy(functional_call(model, fast, (batch.query_x[i],)), batch.query_y[i]))
    return torch.stack(losses).mean()


def reference_meta_grad(
    model: BilevelModel, params: Params, batch: Batch, *, steps: int, lr: float, adapt: str,
    first_order: bool = False,
) -> Params:
    """The MAML meta-gradient by backprop through ``reference_meta_loss``."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = reference_meta_loss(
        model, leaves, batch, steps=steps, lr=lr, adapt=adapt, first_order=first_order
    )
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.fixture
def reference() -> SimpleNamespace:
    return SimpleNamespace(
        adapt=reference_adapt, meta_loss=reference_meta_loss, meta_grad=reference_meta_grad
    )


def _rel_err(a: Params, b: Params) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    return num / den


@pytest.fixture
def rel_err() -> Callable[[Params, Params], float]:
    return _rel_err
