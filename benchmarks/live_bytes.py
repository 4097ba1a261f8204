"""Peak bytes of live tensor storage on any device, read through a dispatch mode.

A process's resident set (``VmHWM``) counts what the allocator keeps mapped as well as the
tensors alive: on CPU two identical processes can differ by tens of MB. :class:`LiveTensorBytes`
counts only storages: every tensor an operator returns under the mode adds its storage's
``nbytes`` once, unless it is an input's storage (a view or an in-place result: no new memory),
and the storage's finaliser subtracts it when the storage is freed. Inside ``vmap`` and ``grad``
the mode sees the physical batched tensors, and the autograd engine's backward runs on the
calling thread under it too. Tensors created before the mode is entered (parameters, the batch)
are not counted: the peak is the operation's own working set, the quantity
``torch.cuda.max_memory_allocated`` gives on CUDA. (``bilevel.execution.memory`` counts the
elements of every op's output with the same kind of mode, for its estimate; this one follows
their lifetimes.)
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as live: fn()`` → ``live.peak`` and ``live.current`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._counted: set[int] = set()

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self._counted or size == 0:
            return
        self._counted.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = {id(leaf.untyped_storage()) for leaf in tree_flatten((args, kwargs))[0] if _real(leaf)}
        out = func(*args, **kwargs)
        for leaf in tree_flatten(out)[0]:
            if _real(leaf) and id(leaf.untyped_storage()) not in inputs:
                self._count(leaf)
        return out


def _real(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.device.type != "meta"
