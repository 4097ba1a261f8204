"""Running a per-task function over the tasks of a meta-batch.

``vmap`` maps with ``torch.func.vmap`` (one batched program); ``loop`` calls the function
task by task and stacks the results. Both return the same pytree with a leading task
axis. Per-task gradients are always ``vmap(grad(task_loss))`` — never ``grad`` of a
vmapped mean, which is wrong for second order through batch-statistics BatchNorm.
``choose_execution`` picks among an algorithm's paths by timing them on the device.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from bilevel.primitives.params import stack_trees

EXECUTIONS = ("auto", "vmap", "loop", "shared")


def map_tasks(fn: Callable[..., Any], mode: str, shared: Any, *per_task: Tensor) -> Any:
    """``fn(shared, *task_i)`` for every task ``i`` (leading axis of ``per_task``), stacked.

    A NamedTuple result may leave fields ``None`` (what a task was not asked for); they stay
    ``None``, every other field gets the task axis."""
    kind: list[type] = []

    def present(*args: Any) -> Any:
        out = fn(*args)
        if not (isinstance(out, tuple) and hasattr(out, "_fields")):
            return out
        kind.append(type(out))
        return {k: v for k, v in out._asdict().items() if v is not None}

    if mode == "vmap":
        in_dims = (None,) + (0,) * len(per_task)
        stacked = torch.func.vmap(present, in_dims=in_dims, randomness="error")(shared, *per_task)
    elif mode == "loop":
        stacked = stack_trees([present(shared, *(t[i] for t in per_task)) for i in range(per_task[0].shape[0])])
    else:
        raise ValueError(f"unknown per-task execution {mode!r}; use 'vmap' or 'loop'")
    return kind[0](**stacked) if kind else stacked


def map_meta_steps(
    task_for: Callable[[Any], Callable[..., Any]], mode: str, shared: Any, *per_task: Tensor, want: Any,
) -> Any:
    """Per-task results of ``task_for(want)`` (a :class:`~bilevel.hypergrad.rows.TaskResult` for a
    :class:`~bilevel.hypergrad.rows.Want`), with a gradient that does not depend on whether
    ``want`` decomposes, bit for bit.

    A plain ``loop`` step runs on plain autograd; a decomposition pass runs on ``torch.func``
    (another differentiation route, so other round-off). So on the ``loop`` a decomposing step
    takes ``grad``, ``loss`` and ``accuracy`` from the plain ``task_for(Want())`` on the same
    inputs (random draws included), and decomposing never changes a training run; the
    decomposing task function need not compute ``grad``.
    """
    out = map_tasks(task_for(want), mode, shared, *per_task)
    if want.terms and mode == "loop":
        plain = map_tasks(task_for(type(want)()), mode, shared, *per_task)
        out = out._replace(grad=plain.grad, loss=plain.loss, accuracy=plain.accuracy)
    return out


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): timings of a step end here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_execution(
    run: Callable[[str], Any], modes: Sequence[str], device: torch.device, repeats: int = 2
) -> tuple[str, dict[str, float]]:
    """Time ``run(mode)`` for each mode (one warm-up, best of ``repeats``); return the fastest."""
    timings: dict[str, float] = {}
    for mode in modes:
        run(mode)
        synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(mode)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        timings[mode] = best
    return min(timings, key=timings.__getitem__), timings
