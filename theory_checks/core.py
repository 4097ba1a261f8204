"""The claim registry: each check is a function returning measured :class:`ClaimResult` rows.

A check module registers functions with :func:`check`; ``python -m theory_checks`` imports
every module of this package, runs every check, prints a table and exits non-zero when a
claim fails.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Callable

import torch

COMPARES = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}


@dataclass
class ClaimResult:
    """One measured claim. ``passed`` is ``value <= threshold`` unless ``compare`` says ``>=``
    (e.g. a gap that must exceed zero), ``==`` (exact zero), or a strict ``<`` / ``>`` (a sign).
    A NaN value never passes."""

    claim: str
    description: str
    value: float
    threshold: float
    compare: str = "<="

    def __post_init__(self) -> None:
        if self.compare not in COMPARES:
            raise ValueError(f"compare must be one of {', '.join(COMPARES)}, got {self.compare!r}")

    @property
    def passed(self) -> bool:
        return bool(COMPARES[self.compare](self.value, self.threshold))

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


CHECKS: list[Callable[[], list[ClaimResult]]] = []


def check(fn: Callable[[], list[ClaimResult]]) -> Callable[[], list[ClaimResult]]:
    """Register a check function (it builds its own small float64 problem, seeded)."""
    CHECKS.append(fn)
    return fn


def max_abs(a: torch.Tensor) -> float:
    """``max |a|`` as a Python float (checks run outside any hot path)."""
    return float(a.detach().abs().max()) if a.numel() else 0.0
