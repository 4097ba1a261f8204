"""A memory estimate of one meta-step per execution path and memory strategy, checked before the first step.

The estimate is a deliberately simple, generous formula, not a measurement. For one task::

    activations = e · A · (n_s · P + n_q) · S
    checkpoints = e · |θ| · (⌈T / K⌉ + 1)          (memory=recompute:K only)

``e``: bytes per element; ``A``: activation elements of one sample's forward through the model
(every intermediate tensor, counted by running two samples through a CPU copy); ``n_s``, ``n_q``:
support and query samples of a task; ``P``: inner steps whose activations are held at once —
``T`` (``inner_steps``) with ``memory=store``, ``min(K, T)`` with ``memory=recompute:K``
(:mod:`bilevel.hypergrad.recompute`), 1 when the inner loop adapts only the head (one encoder
pass); ``S`` = 2 for second order (the inner gradients keep their graph), else 1; ``|θ|``: the
model's parameters. The ``vmap`` and ``shared`` paths hold every task of the meta-batch at once,
``loop`` one; every path holds the meta-batch's images and one gradient per task. Against the
peaks measured on conv4 and ResNet-12 (docs/performance.md, "Memory") it is 1.3-3.5× too high.

The budget is ``train.memory_gb`` or, when null, the memory available now less
:data:`MARGIN` (``MemAvailable`` of ``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on
CUDA; where neither can be read nothing is refused). :func:`memory_plans` returns the
(path, strategy) combinations the configuration allows (``execution``/``memory`` set, or every
one the algorithm offers under ``auto``) that fit, and refuses, with every estimate and the
budget, a configuration none of whose combinations fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bilevel.algorithm import BilevelAlgorithm
from bilevel.errors import ConfigError
from bilevel.validate import parse_memory
from bilevel.primitives.models import BilevelModel

MARGIN = 0.1
"""The share of the available memory a null ``train.memory_gb`` leaves to everything else."""


class _CountOutputs(TorchDispatchMode):
    """Sums the elements of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.elements += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@torch.no_grad()
def activations_per_sample(model: BilevelModel, input_shape: tuple[int, ...]) -> int:
    """``A``: elements of all intermediate tensors of one sample's forward (CPU, no grad)."""
    counter = _CountOutputs()
    with counter:
        model(torch.zeros(2, *input_shape))
    return counter.elements // 2


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory available on ``device`` now, or None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def budget_bytes(memory_gb: Optional[float], device: torch.device) -> Optional[int]:
    """``train.memory_gb`` in bytes, or the available memory less :data:`MARGIN` (None: unknown)."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    available = available_bytes(device)
    return None if available is None else int(available * (1 - MARGIN))


def size_text(n: float) -> str:
    """``n`` bytes in words: ``1.5 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryPlan:
    """One way to run the meta-step: an execution path, a memory strategy and its estimate."""

    path: str
    memory: str
    need: int
    per_task: int

    @property
    def label(self) -> str:
        return f"execution={self.path} memory={self.memory}"


def estimate_bytes(model: BilevelModel, input_shape: tuple[int, ...], cfg: Any, algorithm: BilevelAlgorithm,
                   path: str, memory: str, dtype: torch.dtype, tasks: int) -> int:
    """The module docstring's estimate of one meta-step of ``tasks`` tasks."""
    config, steps = algorithm.config, algorithm.train_steps
    element = torch.empty((), dtype=dtype).element_size()
    segment = parse_memory(memory)
    held = 1 if getattr(config, "adapt", "all") == "head" else (steps if segment is None else min(segment, steps))
    order = 2 if getattr(config, "order", None) == "second_order" else 1
    n_s, n_q = cfg.data.ways * cfg.data.shots, cfg.data.ways * cfg.data.queries
    per_task = element * activations_per_sample(model, input_shape) * (n_s * held + n_q) * order
    weights = sum(p.numel() for p in model.parameters())
    if segment is not None:
        per_task += element * weights * (math.ceil(steps / segment) + 1)
    data = element * tasks * (math.prod(input_shape) * (n_s + n_q) + weights)
    return per_task * (1 if path == "loop" else tasks) + data


def memory_plans(model: BilevelModel, input_shape: tuple[int, ...], cfg: Any, algorithm: BilevelAlgorithm,
                 device: torch.device, dtype: torch.dtype, tasks: Optional[int] = None) -> list[MemoryPlan]:
    """The allowed (path, strategy) combinations that fit the budget, fastest-first by design
    (``store`` before ``recompute``); a :class:`ConfigError` with every estimate and the budget
    when none fits. ``tasks``: the tasks held in that memory at once (a distributed run's shares,
    :func:`bilevel.app.distributed.tasks_in_memory`); default ``train.meta_batch``."""
    paths = algorithm.executions if cfg.execution == "auto" else (cfg.execution,)
    memories = algorithm.memories if cfg.memory == "auto" else (cfg.memory,)
    tasks = cfg.train.meta_batch if tasks is None else tasks
    plans = []
    for memory in memories:
        for path in paths:
            need, one, two = (estimate_bytes(model, input_shape, cfg, algorithm, path, memory, dtype, n)
                              for n in (tasks, 1, 2))
            plans.append(MemoryPlan(path, memory, need, two - one))
    budget = budget_bytes(cfg.train.memory_gb, device)
    fits = [p for p in plans if budget is None or p.need <= budget]
    if not fits:
        raise ConfigError(refusal(plans, budget, cfg, algorithm, device, tasks))
    return fits


def budget_words(plans: list[MemoryPlan], memory_gb: Optional[float], device: torch.device) -> str:
    """The estimates of the combinations that fit against the budget, in words (empty without one)."""
    budget = budget_bytes(memory_gb, device)
    if budget is None:
        return ""
    where = f"train.memory_gb={memory_gb}" if memory_gb is not None else f"the memory available less {MARGIN:.0%}"
    needs = ", ".join(f"{p.label} {size_text(p.need)}" for p in plans)
    return f" (estimated for one meta-step: {needs}; budget {size_text(budget)}, {where})"


def refusal(plans: list[MemoryPlan], budget: int, cfg: Any, algorithm: BilevelAlgorithm, device: torch.device,
            tasks: int) -> str:
    """Why nothing fits, with the numbers and what to change."""
    meta_batch = cfg.train.meta_batch
    smallest = min(plans, key=lambda p: p.need)
    fits = max(max((budget - p.need + p.per_task * tasks) // p.per_task for p in plans), 0) * meta_batch // tasks
    where = (f"train.memory_gb={cfg.train.memory_gb}" if cfg.train.memory_gb is not None
             else f"the memory available on {device.type} less {MARGIN:.0%}")
    held = "" if tasks == meta_batch else f"; {tasks} tasks in this device's memory at once"
    needs = ", ".join(f"{p.label}: {size_text(p.need)}" for p in plans)
    others = [m for m in algorithm.memories if m != "store"] if cfg.memory != "auto" else []
    hint = f", memory=auto or memory={others[0]} (re-runs the inner steps in the backward)" if others else ""
    batch = (f"train.meta_batch must be <= {fits} here (or lower" if fits else
             f"not even one task fits: lower data.ways ({cfg.data.ways}),")
    return (f"train.meta_batch={meta_batch} needs an estimated {size_text(smallest.need)} for one meta-step at "
            f"least ({needs}{held}), but the budget is {size_text(budget)} ({where}); {batch} data.shots/queries, "
            f"the inner steps or the model size{hint}, or raise train.memory_gb{')' if fits else ''}")
