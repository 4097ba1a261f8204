"""The dynamic loss scale of an fp16 run.

Under ``precision=fp16`` the 16-bit derivative kernels see cotangents scaled by ``S`` (inner
loop) and ``S²`` (outer backward) (:mod:`bilevel.primitives.precision`). After every outer step
:meth:`DynamicLossScale.accept` reads, in one host sync, whether the meta-gradient and the
meta-loss are finite: if not, the step is skipped (the optimiser does not move, no NaN reaches
the parameters), counted, said on the console and ``S`` halves; after ``interval`` finite
steps in a row ``S`` doubles (up to ``MAX_SCALE``). bf16 and fp32 runs have no loss scale
(bf16 has float32's range) and no sync.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor

from bilevel.primitives.params import Params

INITIAL_SCALE = 2.0 ** 7
MAX_SCALE = 2.0 ** 16
log = logging.getLogger(__name__)


class DynamicLossScale:
    """``S`` (:attr:`scale`; None: :data:`INITIAL_SCALE`), the steps skipped so far and the finite
    steps in a row; ``backoff`` / ``growth`` multiply ``S`` after an overflow / ``interval`` finite steps."""

    def __init__(self, scale: Optional[float] = None, interval: int = 200, backoff: float = 0.5,
                 growth: float = 2.0) -> None:
        self.scale = float(INITIAL_SCALE if scale is None else scale)
        self.interval, self.backoff, self.growth = interval, backoff, growth
        self.skipped = 0
        self.good = 0

    def accept(self, step: int, grads: Params, loss: Tensor) -> bool:
        """Whether outer step ``step`` may be applied: its meta-gradient and loss are finite
        (one host sync). A non-finite step is counted and logged, and ``S`` shrinks."""
        checks = [torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads.values()]
        finite = bool(torch.stack(checks).all())
        if finite:
            self.good += 1
            if self.good % self.interval == 0:
                self.scale = min(self.scale * self.growth, MAX_SCALE)
            return True
        self.skipped += 1
        self.good = 0
        self.scale *= self.backoff
        log.warning(f"step {step}: fp16 overflow (non-finite meta-gradient); step skipped ({self.skipped} so far), "
                    f"loss scale lowered to {self.scale:g}")
        return False

    def state_dict(self) -> dict[str, Any]:
        """The scale and counters, for the checkpoint."""
        return {"scale": self.scale, "skipped": self.skipped, "good": self.good}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.scale, self.skipped, self.good = float(state["scale"]), int(state["skipped"]), int(state["good"])

