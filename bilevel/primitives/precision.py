"""Mixed precision for the encoder: 16-bit derivative kernels under float32 values.

Policy (``precision=bf16|fp16``; ``fp32`` is the plain float32 engine, untouched, bit for bit).
The encoder's convolutions (and an MLP's linear layers) go through :func:`mixed_op`:

- their **values** stay float32 — the forward pass of the inner and of the outer loop alike;
- their **derivatives** — the backward kernels of the inner loop's differentiable steps, the outer
  backward and the double backward of second order, where a second-order meta-step spends most
  of its time — run in 16 bits: the op is also recorded on 16-bit copies of its inputs, and the
  gradient flows through that copy only (``y = y₃₂ + (y₁₆ − y₁₆)``, exactly ``y₃₂``);
- everything else is float32: the parameters (master copies, and every inner update ``θ − α g``),
  BatchNorm, pooling, ReLU, the features, readout, softmax / cross-entropy and its logits
  gradient, the head update and its trace, the decomposition's terms and checks.

Why not 16-bit forward values (``torch.autocast``): the meta-gradient of a conv + BatchNorm +
max-pool network is a discontinuous function of its activations (every max-pool and ReLU
decision), so rounding one convolution's output or weights to bfloat16 moves second-order
MAML's meta-gradient by 8 – 17 % on glyphs; 16-bit derivatives alone move it by 1.7e-2
(measured: ``docs/performance.md``, "Mixed precision"). ``Policy(forward16=True)`` runs the
convolutions entirely in 16 bits, to measure exactly that.

fp16 only: a loss scale ``S`` (:class:`LossScale`, dynamic in the trainer): the inner loop's
encoder pullbacks take the VJP of ``S·c`` and divide the result by ``S``, the outer backward
that of ``S²·∂L`` (:func:`loss_scales`) — real multiplications, so second order differentiates
them exactly — which lifts the cotangents of every 16-bit derivative kernel (first and second
order) out of fp16's underflow range. An overflow makes the meta-gradient non-finite; the
trainer skips that step and halves ``S`` (:mod:`bilevel.app.loss_scale`). The decomposition's
term rows are not scaled (they are diagnostics, checked in float32 against the plain row).

Use: ``with mixed_precision("bf16"): algorithm.meta_grad(params, batch)``; the trainer enters
it from ``precision=`` for the whole run.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "fp16")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LossScale(Protocol):
    """Anything holding the current loss scale ``S`` (a Python float: read without a sync)."""

    scale: float


@dataclass(frozen=True)
class Policy:
    """The active mixed-precision policy: ``name`` (bf16 / fp16), the loss scale (fp16; None:
    ``S = 1``), and ``forward16`` (values in 16 bits too, like ``torch.autocast``: only to
    measure what that costs)."""

    name: str
    loss_scale: Optional[LossScale] = None
    forward16: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The 16-bit type of the derivative kernels."""
        return LOW_DTYPES[self.name]

    @property
    def scale(self) -> float:
        """``S`` (1 without a loss scale)."""
        return 1.0 if self.loss_scale is None else float(self.loss_scale.scale)


ERROR_BOUND = 2e-2
"""The documented bound on a 16-bit meta-gradient's error against float64 (median over tasks)."""
MEASURED_ERROR: dict[str, dict[str, float]] = {
    "bf16": {"maml": 1.8e-2, "fomaml": 3.8e-2, "anil": 4.2e-3, "imaml": 4.8e-3, "entropy_sgd": 4.2e-2,
             "r2d2": 4.8e-3, "meta_sgd": 1.8e-2},
    "fp16": {},
}
"""Median relative error against float64 of each built-in algorithm's meta-gradient at its default
configuration (conv4 on glyphs, 5-way 1-shot, 15 queries, zero head, the worse of its paths), as
``benchmarks/precision.py`` measured it on the CPU (``docs/performance.md``, "Mixed precision"); fp16
is measured on a GPU only (``benchmarks/gpu_check.sh``)."""

_ACTIVE: ContextVar[Optional[Policy]] = ContextVar("bilevel_mixed_precision", default=None)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError saying which are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@contextmanager
def mixed_precision(precision: str | Policy, loss_scale: Optional[LossScale] = None) -> Iterator[Optional[Policy]]:
    """Run the encoder's ops under ``precision`` within this block (module docstring); ``fp32``
    changes nothing. ``loss_scale`` (fp16) holds ``S``. Yields the active :class:`Policy`
    (None for fp32)."""
    if isinstance(precision, Policy):
        policy: Optional[Policy] = precision
    else:
        policy = None if check_precision(precision) == "fp32" else Policy(precision, loss_scale)
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def loss_scales() -> tuple[float, float]:
    """``(S, S²)``: the factors the inner loop's encoder pullbacks and the outer backward scale
    their cotangents by, and divide out of their results (1 without a loss scale). Plain
    multiplications, so second order differentiates them exactly: the outer pass sees ``S²``
    on its own first-derivative kernels and ``S`` on the second-derivative kernels of the inner
    steps (``S²`` in, ``1/S`` through the inner gradient's value)."""
    policy = _ACTIVE.get()
    s = 1.0 if policy is None else policy.scale
    return s, s * s


def precision_warning(precision: str, algorithm: str, device: Optional[torch.device] = None) -> Optional[str]:
    """What a run under ``precision`` should be told about its meta-gradient's accuracy for
    ``algorithm`` (None for fp32): the measured error and :data:`ERROR_BOUND`, and plainly when the
    error exceeds the bound or was never measured; fp16 on a CPU also hears that it is slow."""
    if precision == "fp32":
        return None
    measured = MEASURED_ERROR.get(precision, {}).get(algorithm)
    if measured is None:
        text = (f"precision={precision}: the meta-gradient error of {algorithm!r} against float64 was not measured "
                f"(documented bound {ERROR_BOUND:g}; benchmarks/precision.py measures it, on a GPU through "
                "benchmarks/gpu_check.sh)")
    else:
        verdict = "ABOVE" if measured > ERROR_BOUND else "within"
        text = (f"precision={precision}: {algorithm}'s meta-gradient measured {measured:.1e} off float64 (median "
                f"over tasks, conv4 glyphs), {verdict} the documented bound {ERROR_BOUND:g} (docs/performance.md, "
                "Mixed precision); precision=fp32 is exact to ~1e-5")
    if precision == "fp16" and device is not None and device.type == "cpu":
        text += ("; fp16 on the CPU runs torch's reference kernels (measured ~17x slower than fp32 per "
                 "convolution): use bf16 on a CPU, fp16 on a GPU")
    return text


def unscale(grads: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    """``grads / factor`` leaf-wise (``grads`` itself when ``factor`` is 1)."""
    return grads if factor == 1.0 else {k: v / factor for k, v in grads.items()}


def mixed_op(op: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``op(*inputs)`` under the active policy (module docstring): the float32 value, the
    derivatives of the op's 16-bit copy (recorded only when something may differentiate it).
    Without a policy (or on inputs that are not float32), exactly ``op(*inputs)``."""
    policy = _ACTIVE.get()
    if policy is None or inputs[0].dtype != torch.float32:
        return op(*inputs)
    if not policy.forward16 and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return op(*inputs)  # nothing will differentiate it: the float32 value alone
    low = op(*(t.to(policy.dtype) for t in inputs))
    if policy.forward16:
        return low.float()
    value = op(*(t.detach() for t in inputs))
    return value + (low - low.detach()).float()
