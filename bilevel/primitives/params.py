"""Parameter dictionaries: the functional core's state.

Parameters are ``dict[str, Tensor]`` keyed by the module path of an ``nn.Module``.
Every model is ``encoder`` + linear ``head``; the head is found by role, through the
keys ``head.weight`` and ``head.bias``, never by position.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

Params = dict[str, Tensor]

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
ENCODER_PREFIX = "encoder."


def is_head(name: str) -> bool:
    """True for the linear head's parameters."""
    return name in (HEAD_WEIGHT, HEAD_BIAS)


def encoder_part(params: Params) -> Params:
    """The encoder's parameters with the ``encoder.`` prefix removed (for ``functional_call``)."""
    n = len(ENCODER_PREFIX)
    return {k[n:]: v for k, v in params.items() if k.startswith(ENCODER_PREFIX)}


def with_encoder(params: Params, encoder: Params) -> Params:
    """``params`` with the encoder entries replaced by ``encoder`` (un-prefixed keys)."""
    out = dict(params)
    out.update({ENCODER_PREFIX + k: v for k, v in encoder.items()})
    return out


def tree_map(fn: Callable[..., Tensor], *trees: Params) -> Params:
    """Apply ``fn`` leaf-wise over dicts that share their keys."""
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def tree_add(a: Params, b: Params, scale: float = 1.0) -> Params:
    """``a + scale * b``."""
    return {k: a[k] + scale * b[k] for k in a}


def tree_sum(trees: list[Params]) -> Params:
    """Leaf-wise sum of a non-empty list of dicts."""
    out = dict(trees[0])
    for t in trees[1:]:
        out = {k: out[k] + t[k] for k in out}
    return out


def tree_detach(tree: Params) -> Params:
    """Stop-gradient on every leaf."""
    return {k: v.detach() for k, v in tree.items()}


def tree_vdot(a: Params, b: Params) -> Tensor:
    """Euclidean inner product ``<a, b>`` summed over all leaves (a 0-d tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)


def tree_norm(a: Params) -> Tensor:
    """Euclidean norm over all leaves (a 0-d tensor; no host sync)."""
    return torch.sqrt(tree_vdot(a, a))


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack a list of identically-structured pytrees along a new leading axis."""
    leaves = [tree_flatten(t)[0] for t in trees]
    spec = tree_flatten(trees[0])[1]
    return tree_unflatten([torch.stack(group) for group in zip(*leaves)], spec)
