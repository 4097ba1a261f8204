"""Watching a run for non-finite values without a host sync per step.

After every outer step :meth:`FiniteGuard.observe` checks, on the device, the meta-loss, every
gradient the optimiser followed, every parameter after the update and the optimiser state shaped
like the parameters (moment estimates, momentum buffers), and keeps per tensor the first step at which it held a NaN or an infinity
— or, in a float64 run, a value beyond float32's range (``|x| > 3.4e38``), which every log
(TensorBoard, ``metrics.json`` readers) records as an infinity: a diverged float64 run whose loss
reads ``inf`` everywhere is stopped like a float32 one.
Nothing is read back until :meth:`FiniteGuard.check` (called at log, evaluation and checkpoint
steps and before stopping), which costs one sync and raises
:class:`~bilevel.errors.NonFiniteError` naming the first bad tensor in causal order (loss,
gradient, parameter, optimiser state) of the first bad step. So no checkpoint, evaluation or
``metrics.json`` ever follows a non-finite value unnoticed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bilevel.errors import NonFiniteError
from bilevel.primitives.params import Params


def step_tensors(loss: Tensor, grads: Params, params: Params, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """The tensors of one outer step, named and in causal order. Of the optimiser state, the
    tensors shaped like their parameter (moment estimates, momentum buffers), which live on its
    device; counters such as Adam's ``step`` may live on the CPU and are left out."""
    names = {id(p): k for k, p in params.items()}
    named = [("the meta-loss", loss)]
    named += [(f"the gradient of {k}", g) for k, g in grads.items()]
    named += [(f"parameter {k}", p) for k, p in params.items()]
    for p, state in optimizer.state.items():
        named += [(f"optimiser state {s!r} of {names.get(id(p), '?')}", v) for s, v in state.items()
                  if isinstance(v, Tensor) and v.shape == p.shape]
    return named


def _in_float32(t: Tensor) -> Tensor:
    """``t`` as float32 when it is float64 (a value beyond float32's range becomes ±inf), else ``t``."""
    return t.float() if t.dtype == torch.float64 else t


class FiniteGuard:
    """Accumulates where and when non-finite values appeared (see the module docstring)."""

    def __init__(self, device: torch.device, checked_until: int) -> None:
        self.device = device
        self.checked_until = checked_until  # every step up to here is known to be finite
        self._index: dict[str, int] = {}  # name -> slot, in order of first appearance
        self._first = torch.empty(0, dtype=torch.int64, device=device)  # first bad step per slot, -1: finite
        self._names: tuple[str, ...] = ()
        self._slots = torch.empty(0, dtype=torch.int64, device=device)
        self._float64 = False

    def observe(self, step: int, named: list[tuple[str, Tensor]]) -> None:
        """Record which of ``named`` hold non-finite values after ``step`` (no sync)."""
        names = tuple(n for n, _ in named)
        if names != self._names:  # first step, or the set of tensors changed (lazily created state)
            for name in names:
                self._index.setdefault(name, len(self._index))
            grown = len(self._index) - self._first.numel()
            self._first = torch.cat([self._first, self._first.new_full((grown,), -1)])
            self._slots = torch.tensor([self._index[n] for n in names], dtype=torch.int64, device=self.device)
            self._names = names
        self._float64 = self._float64 or any(t.dtype == torch.float64 for _, t in named)
        bad = ~torch.stack([torch.isfinite(_in_float32(t)).all() for _, t in named])
        current = self._first[self._slots]
        self._first[self._slots] = torch.where(bad & (current < 0), step, current)

    def check(self, step: int, last_good: str) -> None:
        """Raise :class:`NonFiniteError` if anything observed up to ``step`` was non-finite;
        ``last_good`` describes the last good checkpoint for the message."""
        first = self._first.tolist()
        bad = [s for s in first if s >= 0]
        if bad:
            at = min(bad)
            culprits = [name for name, slot in self._index.items() if first[slot] == at]
            others = f" (and {len(culprits) - 1} more tensors in that step)" if len(culprits) > 1 else ""
            raise NonFiniteError(
                f"non-finite values in {culprits[0]} at step {at}{others}, found by the check after step {step} "
                f"(the previous check, after step {self.checked_until}, passed); last good checkpoint: {last_good}. "
                "Lower train.lr or the algorithm's inner_lr, or use dtype=float64. The run was stopped; no "
                "metrics were written." + (" (In float64, a value beyond float32's range, 3.4e38, counts as "
                                           "infinite: every log would record it as inf.)" if self._float64 else "")
            )
        self.checked_until = step
