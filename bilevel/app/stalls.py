"""Warnings for a run that trains without learning.

Two signs, read at the training log points (``train.log_every``), each said once per run on the
console and in ``train.log`` with what to check:

* **a meta-gradient below round-off**: the encoder's meta-gradient ``g`` satisfies
  ``‖g‖ ≤ ROUND_OFF · ε · ‖θ‖`` (``ε`` the dtype's machine epsilon, ``θ`` the encoder's
  parameters) at every log point of at least :data:`PATIENCE` steps in a row. Such a step
  cannot move the encoder, and the decomposition's identity check passes vacuously. Example: an
  inner loop that adapts only the encoder (BOIL) from the zero head of ``head.policy=zeroing``.
* **accuracy at chance**: the mean training accuracy of every log window of at least
  :data:`PATIENCE` steps in a row is within 3 standard errors of chance ``1/N``, the standard
  error being that of a chance-level classifier over the window's queries,
  ``sqrt(p (1 − p) / n)`` with ``p = 1/N``.

The step itself is not touched: the checks read the last step's gradient and the window's mean
accuracy, which the log point reads back anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bilevel.primitives.params import ENCODER_PREFIX, Params, tree_norm

PATIENCE = 50
"""Steps in a row a sign must hold before the run warns."""
ROUND_OFF = 10.0
"""``‖g‖ ≤ ROUND_OFF · ε · ‖θ‖`` is a meta-gradient below round-off."""

GRADIENT_ADVICE = (
    "the encoder is not learning. Check that the inner loop can move from the head it starts with (an inner "
    "loop that adapts only the encoder learns nothing from the zero head of head.policy=zeroing: use "
    "head.policy=random), that the query loss depends on the encoder, and the learning rates; the "
    "decomposition's identity check passes vacuously on a zero meta-gradient"
)
CHANCE_ADVICE = (
    "check head.policy (an algorithm whose inner loop cannot learn from a zero head needs head.policy=random), "
    "train.lr and the algorithm's inner_lr, and the meta-gradient's norm (decomp/total/norm)"
)


class StallWatch:
    """Counts the steps in a row that show each sign (module docstring); :meth:`check` returns a
    warning the first time a count reaches ``patience``."""

    def __init__(self, ways: int, queries_per_step: int, patience: Optional[int] = None) -> None:
        self.chance = 1.0 / ways
        self.queries_per_step = queries_per_step
        self.patience = PATIENCE if patience is None else patience
        self.tiny_steps = 0
        self.chance_steps = 0
        self.said: set[str] = set()

    def check(self, done: int, grad: Params, params: Params, accuracy: Tensor, steps: int) -> list[str]:
        """After ``done`` steps: ``grad`` is the last step's meta-gradient, ``accuracy`` the mean
        training accuracy of the ``steps`` steps since the last log point (none when every one was
        a skipped fp16 step: nothing to judge). Returns the warnings due now (each at most once per run)."""
        if steps == 0:
            return []
        encoder = [k for k in grad if k.startswith(ENCODER_PREFIX)]
        norm = float(tree_norm({k: grad[k] for k in encoder}))
        bound = ROUND_OFF * torch.finfo(grad[encoder[0]].dtype).eps * float(tree_norm({k: params[k] for k in encoder}))
        self.tiny_steps = self.tiny_steps + steps if norm <= bound else 0
        acc = float(accuracy)
        error = (self.chance * (1.0 - self.chance) / (steps * self.queries_per_step)) ** 0.5
        self.chance_steps = self.chance_steps + steps if abs(acc - self.chance) <= 3.0 * error else 0
        due = []
        if self.tiny_steps >= self.patience and "gradient" not in self.said:
            due.append(f"after step {done}, the encoder's meta-gradient has been below round-off for "
                       f"{self.tiny_steps} steps (|g| = {norm:.1e} <= {ROUND_OFF:g} eps |theta| = {bound:.1e}): "
                       + GRADIENT_ADVICE)
            self.said.add("gradient")
        if self.chance_steps >= self.patience and "chance" not in self.said:
            due.append(f"after step {done}, the training accuracy has stayed at chance for {self.chance_steps} "
                       f"steps ({acc:.3f}, chance 1/{round(1 / self.chance)} = {self.chance:.3f}): " + CHANCE_ADVICE)
            self.said.add("chance")
        return due
