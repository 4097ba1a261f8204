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
from torch.utils._pytree import tree_flatten, tree_unflatten

EXECUTIONS = ("auto", "vmap", "loop", "shared")


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack a list of identically-structured pytrees along a new leading axis."""
    leaves = [tree_flatten(t)[0] for t in trees]
    spec = tree_flatten(trees[0])[1]
    return tree_unflatten([torch.stack(group) for group in zip(*leaves)], spec)


def map_tasks(fn: Callable[..., Any], mode: str, shared: Any, *per_task: Tensor) -> Any:
    """``fn(shared, *task_i)`` for every task ``i`` (leading axis of ``per_task``), stacked."""
    if mode == "vmap":
        in_dims = (None,) + (0,) * len(per_task)
        return torch.func.vmap(fn, in_dims=in_dims, randomness="error")(shared, *per_task)
    if mode == "loop":
        return stack_trees([fn(shared, *(t[i] for t in per_task)) for i in range(per_task[0].shape[0])])
    raise ValueError(f"unknown per-task execution {mode!r}; use 'vmap' or 'loop'")


def map_meta_steps(
    make_fn: Callable[[bool], Callable[..., dict[str, Any]]], mode: str, shared: Any, *per_task: Tensor,
    decompose: bool,
) -> dict[str, Any]:
    """Per-task outputs of ``make_fn(decompose)`` (a dict with ``grad``, ``loss``,
    ``accuracy``), with a gradient that does not depend on ``decompose``, bit for bit.

    A plain ``loop`` step runs on plain autograd; a decomposition pass runs on ``torch.func``
    (another differentiation route, so other round-off). So on the ``loop`` a decomposition
    step takes ``grad``, ``loss`` and ``accuracy`` from ``make_fn(False)`` on the same inputs
    (random draws included), and decomposing never changes a training run;
    ``make_fn(True)`` need not compute ``grad``.
    """
    out = map_tasks(make_fn(decompose), mode, shared, *per_task)
    if decompose and mode == "loop":
        plain = map_tasks(make_fn(False), mode, shared, *per_task)
        out.update(grad=plain["grad"], loss=plain["loss"], accuracy=plain["accuracy"])
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_execution(
    run: Callable[[str], Any], modes: Sequence[str], device: torch.device, repeats: int = 2
) -> tuple[str, dict[str, float]]:
    """Time ``run(mode)`` for each mode (one warm-up, best of ``repeats``); return the fastest."""
    timings: dict[str, float] = {}
    for mode in modes:
        run(mode)
        _synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(mode)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
        timings[mode] = best
    return min(timings, key=timings.__getitem__), timings


def reduce_tasks(key: str, value: Any) -> Any:
    """Reduce per-task outputs: means for gradients and scalars, max for check errors,
    concatenation for per-task matrices (which already have a task axis)."""
    if key == "reconstruction":
        return value.amax()
    if key in ("pairs", "cosines"):
        return value
    if isinstance(value, dict):
        return {k: v.mean(0) for k, v in value.items()}
    return value.mean(0)
