"""One flat buffer per reduction, summed across the processes by one ``all_reduce(SUM)``.

Each rank's :class:`~bilevel.decomposition.step.MetaStep` holds means over its ``n_r`` tasks; a
:class:`Pack` lays out its contributions so that the sum is the reduction each field declares:

* means as sums ``n_r · ḡ_r``, divided by ``T = Σ_r n_r`` after the sum: the mean over all
  ``T`` tasks, whatever the split (meta-gradient, loss, accuracy, extras, every decomposition
  term and the total, the encoder-adaptation diagnostic);
* per-task matrices (pair weights, feature cosines, same-class masks, labels) at their global
  task rows of a zero ``[T, ...]`` block: the sum is a gather, exactly;
* non-negative maxima (the reconstruction error, the stop signal) at the rank's slot of a zero
  ``[W]`` block, the maximum taken after the sum: exact as well.

So the reduced decomposition is the single-process one up to the summation order of the means.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from bilevel.app.distributed.launch import Launch


class Slot:
    """Where one tensor's contribution lies in a :class:`Pack` and how to read it back."""

    def __init__(self, start: int, shape: torch.Size, dtype: torch.dtype, read: Callable[[Tensor], Tensor]) -> None:
        self.start, self.shape, self.dtype, self.read = start, shape, dtype, read


class Pack:
    """Contributions of one rank to a flat buffer summed across ranks (see the module
    docstring): :meth:`mean`, :meth:`rows` and :meth:`maximum` return slots; once the
    :meth:`buffer` has been summed, :meth:`value` reads each slot's reduced tensor. A tensor
    added twice (the same object, e.g. a decomposition's total that is also the meta-gradient)
    takes one slot."""

    def __init__(self, launch: Launch, first: int, tasks: int, total: int) -> None:
        self.launch, self.first, self.tasks, self.total = launch, first, tasks, total
        self._parts: list[Tensor] = []
        self._slots: dict[int, Slot] = {}
        self._sources: list[Tensor] = []  # kept alive, so that their ids, the slots' keys, stay theirs
        self._size = 0
        self._flat: Optional[Tensor] = None

    def _add(self, tensor: Tensor, contribution: Tensor, read: Callable[[Tensor], Tensor]) -> Slot:
        slot = self._slots.get(id(tensor))
        if slot is None:
            slot = Slot(self._size, contribution.shape, tensor.dtype, read)
            self._slots[id(tensor)] = slot
            self._sources.append(tensor)
            self._parts.append(contribution.reshape(-1))
            self._size += contribution.numel()
        return slot

    def mean(self, tensor: Tensor) -> Slot:
        """A mean over this rank's tasks → the mean over all tasks of the meta-batch."""
        return self._add(tensor, tensor.detach() * self.tasks, lambda summed: summed / self.total)

    def rows(self, tensor: Tensor) -> Slot:
        """A per-task tensor ``[n_r, ...]`` → ``[T, ...]`` over the whole meta-batch (a gather)."""
        if tensor.shape[0] != self.tasks:
            raise ValueError(f"a per-task tensor of shape {tuple(tensor.shape)} does not have this rank's "
                             f"{self.tasks} tasks on its first axis")
        block = tensor.new_zeros((self.total, *tensor.shape[1:]), dtype=torch.float64)  # holds masks and labels
        block[self.first: self.first + self.tasks] = tensor.detach()
        return self._add(tensor, block, lambda summed: summed)

    def maximum(self, tensor: Tensor) -> Slot:
        """A non-negative scalar → its maximum over the ranks."""
        block = tensor.new_zeros(self.launch.world, dtype=torch.float64)
        block[self.launch.rank] = tensor.detach()
        return self._add(tensor, block, lambda summed: summed.amax())

    def buffer(self, dtype: torch.dtype) -> Tensor:
        """The flat buffer of every contribution in ``dtype``; sum it across ranks in place."""
        self._flat = torch.cat([p.to(dtype) for p in self._parts])
        return self._flat

    def value(self, slot: Slot) -> Tensor:
        """The reduced tensor of ``slot`` (in the dtype its tensor had)."""
        summed = self._flat[slot.start: slot.start + slot.shape.numel()].view(slot.shape)
        return slot.read(summed).to(slot.dtype)


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every leaf of a pytree of dicts, lists and tuples; None stays None."""
    return tree_map(lambda leaf: None if leaf is None else fn(leaf), tree)
