"""How a result's fields reduce over tasks and processes: each result type declares, per field,
one of :data:`MEAN`, :data:`ROWS` or :data:`MAX` in its ``REDUCTION``; :func:`reduce_fields`
applies the reducers a caller supplies for each kind (a mean over the task axis in one
process, an ``all_reduce`` slot across processes)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor
from torch.utils._pytree import tree_map

MEAN = "mean"
"""The field is averaged over tasks (gradients, losses, accuracies, per-task scalars)."""
ROWS = "rows"
"""The field keeps one row per task (pair weights, feature cosines, class masks)."""
MAX = "max"
"""The field is the largest over tasks (a check's error: the worst task decides)."""


def reduce_fields(values: Mapping[str, Any], reduction: Mapping[str, str],
                  reducers: Mapping[str, Callable[[Tensor], Any]]) -> dict[str, Any]:
    """The fields named in ``reduction``, each reduced leaf by leaf (dicts of tensors are
    trees) by ``reducers[reduction[name]]``; a None field stays None."""
    def reduce(value: Any, fn: Callable[[Tensor], Any]) -> Any:
        return None if value is None else tree_map(lambda leaf: None if leaf is None else fn(leaf), value)

    return {name: reduce(values[name], reducers[kind]) for name, kind in reduction.items()}
