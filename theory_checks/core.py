"""The claim registry: each check is a function returning measured :class:`ClaimResult` rows.

A check module registers functions with :func:`check`; ``python -m theory_checks`` imports
every module of this package, runs every check, prints a table and exits non-zero when a
claim fails.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class ClaimResult:
    """One measured claim. ``passed`` is ``value <= threshold`` unless ``compare`` says ``>=``
    (e.g. a gap that must exceed zero) or ``==`` (exact zero)."""

    claim: str
    description: str
    value: float
    threshold: float
    compare: str = "<="

    @property
    def passed(self) -> bool:
        if self.compare == ">=":
            return self.value >= self.threshold
        if self.compare == "==":
            return self.value == self.threshold
        return self.value <= self.threshold

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


CHECKS: list[Callable[[], list[ClaimResult]]] = []


def check(fn: Callable[[], list[ClaimResult]]) -> Callable[[], list[ClaimResult]]:
    """Register a check function (it builds its own small float64 problem, seeded)."""
    CHECKS.append(fn)
    return fn


def max_abs(a: torch.Tensor) -> float:
    """``max |a|`` as a Python float (checks run outside any hot path)."""
    return float(a.abs().max()) if a.numel() else 0.0
