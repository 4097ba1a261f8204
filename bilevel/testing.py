"""Seeded problems, an independent MAML reference and relative errors, shared by the tests and
``theory_checks`` (which ships in the package, so this module does too).

* :func:`seeded_problem`: a seeded model (``mlp`` or ``conv4``), its parameters (random head,
  or the zeroing trick ``W = b = 0``) and a Gaussian meta-batch (:func:`seeded_batch`). The
  random draws are fixed by the arguments: the global seed is set to ``seed`` before the model
  is built, and the batch is drawn from a generator of its own (``batch_seed``, default
  ``seed``) — label permutations first, then the support inputs, then the query inputs.
* :func:`reference_meta_grad` (with :func:`reference_adapt`, :func:`reference_meta_loss`): a
  plain-autograd unrolled MAML — ``F.cross_entropy`` of the whole model through
  ``functional_call``, inner gradients by ``torch.autograd.grad`` (``create_graph`` for second
  order). It shares nothing with the engine but the model definition.
* :func:`rel_err`: ``‖a − b‖ / ‖b‖`` over tensors or parameter dicts, as a float.

Nothing here is imported by the engine; it depends only on ``torch`` and the model builders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel.algorithm import BilevelAlgorithm, build_algorithm
from bilevel.data.batch import TaskBatch
from bilevel.primitives.models import BilevelModel, ModelConfig, build_model
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, Params, is_head

INPUT_SHAPES = {"mlp": (4,), "conv4": (1, 16, 16)}
"""The default input shape of each tiny model."""
INNER_LR = 0.4
"""The inner step size of :meth:`Problem.algorithm`."""
HEADS = ("random", "zero")


def class_labels(ways: int, per_class: int, tasks: int) -> Tensor:
    """``[tasks, ways · per_class]`` int64 labels laid out class by class: ``0 0 1 1 2 2 …``."""
    return torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)


def labelled_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   ways: int) -> TaskBatch:
    """A whole meta-batch of the given tensors whose dataset classes are its labels
    (``classes[t, j] = j``)."""
    classes = torch.arange(ways, device=support_y.device).repeat(support_y.shape[0], 1)
    return TaskBatch(support_x, support_y, query_x, query_y, classes)


def seeded_batch(generator: torch.Generator, *, ways: int, shots: int, queries: int, tasks: int,
                 shape: Sequence[int], dtype: torch.dtype = torch.float64, permute: bool = False) -> TaskBatch:
    """Standard-normal inputs ``[tasks, ways · k, *shape]`` (``k`` = ``shots`` / ``queries``),
    labels class by class. ``permute``: each task relabels its classes by a random permutation
    ``π`` (class ``c`` carries label ``π(c)``; ``classes[t]`` is ``π⁻¹``), drawn before the inputs."""
    support_y, query_y = class_labels(ways, shots, tasks), class_labels(ways, queries, tasks)
    classes = torch.arange(ways).repeat(tasks, 1)
    if permute:
        perms = torch.stack([torch.randperm(ways, generator=generator) for _ in range(tasks)])
        support_y, query_y, classes = perms.gather(1, support_y), perms.gather(1, query_y), perms.argsort(1)
    return TaskBatch(
        support_x=torch.randn(tasks, ways * shots, *shape, generator=generator, dtype=dtype),
        support_y=support_y,
        query_x=torch.randn(tasks, ways * queries, *shape, generator=generator, dtype=dtype),
        query_y=query_y,
        classes=classes,
    )


@dataclass(frozen=True)
class Problem:
    """A model, its parameters and a meta-batch; ``inner_lr`` is what :meth:`algorithm` uses."""

    model: BilevelModel
    params: Params
    batch: TaskBatch
    inner_lr: float = INNER_LR

    @property
    def ways(self) -> int:
        """Number of classes per task."""
        return self.batch.ways

    def algorithm(self, **config: Any) -> BilevelAlgorithm:
        """The registered MAML plugin on this model, with this problem's ``inner_lr``."""
        return build_algorithm({"name": "maml", "inner_lr": self.inner_lr, **config}, self.model)


def seeded_problem(
    name: str = "mlp",
    *,
    dtype: torch.dtype = torch.float64,
    ways: int = 3,
    shots: int = 1,
    queries: int = 2,
    tasks: int = 2,
    shape: Optional[Sequence[int]] = None,
    hidden: int = 8,
    layers: int = 2,
    channels: Optional[int] = 4,
    head: str = "random",
    permute: bool = False,
    seed: int = 0,
    batch_seed: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
) -> Problem:
    """A seeded problem (module docstring): model ``name`` (``hidden``/``layers`` for the MLP,
    ``channels`` for conv4, None: the model's default width) on inputs of ``shape`` (default
    :data:`INPUT_SHAPES`), in ``dtype`` on ``device``; ``head="zero"`` sets ``W = b = 0``.
    The batch is drawn on the CPU and moved to ``device``."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    shape = tuple(INPUT_SHAPES[name] if shape is None else shape)
    generator = torch.Generator().manual_seed(seed if batch_seed is None else batch_seed)
    torch.manual_seed(seed)
    config = ModelConfig(name=name, hidden=hidden, layers=layers, channels=channels)
    model = build_model(config, shape, ways).to(device=device, dtype=dtype)
    params = model.init_params()
    if head == "zero":
        params[HEAD_WEIGHT] = torch.zeros_like(params[HEAD_WEIGHT])
        params[HEAD_BIAS] = torch.zeros_like(params[HEAD_BIAS])
    batch = seeded_batch(generator, ways=ways, shots=shots, queries=queries, tasks=tasks, shape=shape, dtype=dtype,
                         permute=permute)
    return Problem(model, params, batch.to(device))


def reference_adapt(model: BilevelModel, params: Params, x: Tensor, y: Tensor, *, steps: int, lr: float,
                    adapt: str, first_order: bool) -> Params:
    """One task's ``θ_{t+1} = θ_t − α ∇ L_S(θ_t)`` over the adapted keys (``head``: W, b; ``all``:
    every parameter), by ``torch.autograd.grad``; first order takes the inner gradients without a
    graph (constants). ``params`` must require grad for a meta-gradient to flow."""
    keys = [k for k in params if adapt == "all" or is_head(k)]
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
        fast.update({k: fast[k] - lr * g for k, g in zip(keys, grads)})
    return fast


def reference_meta_loss(model: BilevelModel, params: Params, batch: TaskBatch, *, steps: int, lr: float,
                        adapt: str, first_order: bool = False) -> Tensor:
    """Mean over tasks of the query cross-entropy after :func:`reference_adapt`."""
    losses = []
    for i in range(batch.support_y.shape[0]):
        fast = reference_adapt(model, params, batch.support_x[i], batch.support_y[i],
                               steps=steps, lr=lr, adapt=adapt, first_order=first_order)
        losses.append(F.cross_entropy(functional_call(model, fast, (batch.query_x[i],)), batch.query_y[i]))
    return torch.stack(losses).mean()


def reference_meta_grad(model: BilevelModel, params: Params, batch: TaskBatch, *, steps: int, lr: float,
                        adapt: str, first_order: bool = False) -> Params:
    """The MAML meta-gradient (all parameters) by backprop through :func:`reference_meta_loss`."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = reference_meta_loss(model, leaves, batch, steps=steps, lr=lr, adapt=adapt, first_order=first_order)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def rel_err(a: Union[Tensor, Mapping[str, Tensor]], b: Union[Tensor, Mapping[str, Tensor]],
            keys: Optional[Sequence[str]] = None) -> float:
    """``‖a − b‖ / ‖b‖`` (Euclidean, over every entry of every leaf), as a float.

    ``a`` and ``b`` are tensors or parameter dicts; dicts are compared over ``keys``, by
    default ``b``'s, which must then be ``a``'s too. When ``b`` is exactly zero the result is the
    absolute error ``‖a‖`` (0 when both are zero), so that exact zeros compare without a
    division by zero."""
    if isinstance(b, Tensor):
        a, b = {"": a}, {"": b}
    if keys is None:
        if a.keys() != b.keys():
            raise ValueError(f"rel_err: the dicts have different keys: {sorted(a)} vs {sorted(b)}")
        keys = list(b)
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in keys) ** 0.5
    return num / den if den else num
