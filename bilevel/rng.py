"""The process-wide random state (torch's CPU generator and every CUDA generator) as one value.

A checkpoint stores it, so a plugin that draws from the global generator still resumes bit for
bit; trial computations (``execution=auto``'s measurement) run between :func:`global_rng_state`
and :func:`set_global_rng_state` so they leave it as they found it.
"""
from __future__ import annotations

from typing import Any

import torch


def global_rng_state() -> dict[str, Any]:
    """A copy of the CPU generator's state and, with CUDA, every device generator's."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`global_rng_state` (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
