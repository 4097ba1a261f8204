"""A memory estimate of one meta-step, checked against the device before the first step.

The estimate is a deliberately simple, generous formula, not a measurement::

    bytes = element_size · A · N · T · P · 2 · S

``A``: activation elements of one sample's forward through the model (every intermediate
tensor, counted by running two samples through a CPU copy); ``N``: samples of a task, ways ×
(shots + queries); ``T``: tasks of the meta-batch (``train.meta_batch``; every task at once, as
``vmap`` holds them); ``P``: encoder passes, ``inner_steps + 1`` when the inner loop adapts the
encoder and 1 when it adapts only the head; 2 for the backward's gradients; ``S`` = 2 for
second order (``order=second_order``: the inner gradients keep their graph) and 1 otherwise.
A run is refused only when this exceeds the memory available now (``MemAvailable`` of
``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on CUDA); where neither can be read the
check is skipped.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bilevel.errors import ConfigError
from bilevel.primitives.models import BilevelModel


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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_meta_step_memory(model: BilevelModel, input_shape: tuple[int, ...], cfg: Any, algorithm_config: Any,
                           inner_steps: int, device: torch.device, dtype: torch.dtype,
                           tasks: Optional[int] = None) -> None:
    """Refuse (:class:`ConfigError` naming ``train.meta_batch``) a meta-step whose estimate (see
    the module docstring) exceeds the memory available on ``device``. ``tasks``: the tasks held
    in that memory at once (a distributed run's shares, :func:`bilevel.app.distributed.tasks_in_memory`);
    default ``train.meta_batch``."""
    available = available_bytes(device)
    if available is None:
        return
    passes = inner_steps + 1 if getattr(algorithm_config, "adapt", "all") == "all" else 1
    order = 2 if getattr(algorithm_config, "order", None) == "second_order" else 1
    samples = cfg.data.ways * (cfg.data.shots + cfg.data.queries)
    element = torch.empty((), dtype=dtype).element_size()
    per_task = element * activations_per_sample(model, input_shape) * samples * passes * 2 * order
    meta_batch = cfg.train.meta_batch
    tasks = meta_batch if tasks is None else tasks
    need = per_task * tasks
    if need > available:
        fits = max(available // per_task, 0) * meta_batch // tasks
        held = "" if tasks == meta_batch else f"; {tasks} tasks in this device's memory at once"
        fix = (f"train.meta_batch must be <= {fits} here (or lower data.shots/queries, the inner steps or the model "
               f"size)" if fits > 0 else f"not even one task fits: lower data.ways ({cfg.data.ways}), "
               f"data.shots/queries, the inner steps or the model size")
        raise ConfigError(
            f"train.meta_batch={meta_batch} needs an estimated {_size(need)} for one meta-step "
            f"({_size(per_task)} per task of {samples} samples{held}), but {_size(available)} is available on "
            f"{device.type}; {fix}"
        )
