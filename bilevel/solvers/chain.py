"""SGD / Langevin chains on one task (docs/theory.md §6): the solver of Entropy-SGD and Reptile.

On the parameters ``x = (θ, W, b)`` restricted to the adapted set (``"all"``, or ``"head"``: the
encoder stays at ``θ``), for ``ℓ = 1 … L`` on the task's batch ``B``:

    dx'_ℓ = ∇f_B(x'_{ℓ−1}) − γ (x − x'_{ℓ−1})
    x'_ℓ  = x'_{ℓ−1} − η' dx'_ℓ + sqrt(η') ε n_ℓ,        x'_0 = x
    μ_ℓ   = (1 − a) μ_{ℓ−1} + a x'_ℓ,                    μ_0 = x

and the direction ``d = s (x − μ_L)``; the conventions (noise, EMA, displacements, the
non-adapted parameters' chain-average gradient) are stated in :mod:`bilevel.hypergrad.chain`,
which turns the chain into a hypergradient and decomposes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import vjp

from bilevel.primitives.head import HeadState, head_add_noise, head_displacement, head_shrink, head_write, init_head, readout
from bilevel.primitives.losses import accuracy, cross_entropy, cross_entropy_logits_grad
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, is_head, with_encoder
from bilevel.solvers.support import ADAPTED_SETS


BATCHES = ("pooled", "support", "query")


@dataclass(frozen=True)
class ChainSpec:
    """One chain: ``steps`` L, ``lr`` η', coupling ``gamma`` γ, ``noise`` ε, EMA weight ``ema``
    a, direction ``scale`` s and the adapted set (module docstring)."""

    steps: int
    lr: float
    gamma: float
    noise: float
    ema: float
    scale: float
    adapt: str

    def __post_init__(self) -> None:
        if self.adapt not in ADAPTED_SETS:
            raise ValueError(f"adapt must be one of {ADAPTED_SETS}, got {self.adapt!r}")
        if self.steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.steps}")
        if not 0.0 < self.ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {self.ema}")
        if self.lr <= 0 or self.gamma < 0 or self.noise < 0:
            raise ValueError(f"need inner_lr > 0, gamma >= 0, noise >= 0; got {self.lr}, {self.gamma}, {self.noise}")

    def adapted(self, key: str) -> bool:
        """Whether parameter ``key`` moves in the chain."""
        return self.adapt == "all" or is_head(key)

    def iterate_weights(self) -> tuple[float, ...]:
        """``w_ℓ = Σ_{k=ℓ}^{L} a (1 − a)^{L−k} ρ^{k−ℓ}``, ``ρ = 1 − η'γ``."""
        a, rho, n = self.ema, 1.0 - self.lr * self.gamma, self.steps
        return tuple(sum(a * (1 - a) ** (n - k) * rho ** (k - l) for k in range(l, n + 1)) for l in range(1, n + 1))

    def gradient_weights(self) -> tuple[float, ...]:
        """``v_1 = (1 − a)^{L−1}``, ``v_ℓ = a (1 − a)^{L−ℓ}``: the EMA of the gradients (sums to 1)."""
        a, n = self.ema, self.steps
        return tuple((1 - a) ** (n - 1) if l == 1 else a * (1 - a) ** (n - l) for l in range(1, n + 1))

    def step_weights(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-step coefficients of the gradients of adapted and of non-adapted parameters in ``d``."""
        return tuple(self.scale * self.lr * w for w in self.iterate_weights()), self.gradient_weights()

    @property
    def noise_amplitude(self) -> float:
        """``sqrt(η') ε``: the standard deviation of one step's noise."""
        return math.sqrt(self.lr) * self.noise

    def terms(self) -> tuple[str, ...]:
        """The decomposition terms this chain produces (noise terms only when ``ε > 0``)."""
        noisy = ("noise",) + (("encoder_noise",) if self.adapt == "all" else ()) if self.noise else ()
        return ("contrastive", "init") + noisy


class ChainStep(NamedTuple):
    """What step ℓ read: the head ``W_{ℓ−1}`` with its trace, ``Φ_ℓ``, ``Z_ℓ``, ``G_ℓ`` and the
    VJP of ``φ(·, X)`` at ``θ'_{ℓ−1}``."""

    head: HeadState
    features: Tensor
    logits: Tensor
    logits_grad: Tensor
    pull_back: Callable


class ChainResult(NamedTuple):
    """The direction ``d`` (all parameters), the mean over steps of ``f_B(x'_{ℓ−1})`` and of its
    accuracy, and the steps (recorded on request)."""

    direction: Params
    loss: Tensor
    accuracy: Tensor
    steps: tuple[ChainStep, ...]


class _EncoderChain:
    """The encoder's side of a chain: ``θ'`` carried as the displacement ``u = θ' − θ`` with its EMA
    (``adapt="all"``), or the frozen encoder's features at ``θ`` and the weighted sum of every
    step's cotangent on them (``adapt="head"``: one VJP at the end)."""

    def __init__(self, model: BilevelModel, encoder: Params, x: Tensor, spec: ChainSpec,
                 noise: Optional[Params]) -> None:
        self.model, self.encoder, self.x, self.spec, self.noise = model, encoder, x, spec, noise
        if spec.adapt == "all":
            self.disp = {k: torch.zeros_like(v) for k, v in encoder.items()}
            self.mean = dict(self.disp)
        else:
            self.features, self.pull = vjp(lambda e: model.encode(e, x), encoder)
            self.cotangent = torch.zeros_like(self.features)

    def features_at_step(self) -> tuple[Tensor, Callable, Optional[Params]]:
        """``Φ_ℓ``, its VJP and the point ``θ'_{ℓ−1}`` (None when the encoder is frozen)."""
        if self.spec.adapt != "all":
            return self.features, self.pull, None
        point = {k: self.encoder[k] + self.disp[k] for k in self.encoder}
        feats, pull = vjp(lambda e: self.model.encode(e, self.x), point)
        return feats, pull, point

    def advance(self, l: int, cotangent: Tensor, pull: Callable) -> None:
        """Step ``ℓ``: ``u ← ρ u − η' ∇_θ f + sqrt(η') ε n`` and its EMA, or add ``v_ℓ`` times the cotangent."""
        spec = self.spec
        if spec.adapt != "all":
            self.cotangent = self.cotangent + spec.gradient_weights()[l] * cotangent
            return
        (grad,) = pull(cotangent)
        rho, a = 1.0 - spec.lr * spec.gamma, spec.ema
        self.disp = {k: rho * u - spec.lr * grad[k] for k, u in self.disp.items()}
        if spec.noise:
            self.disp = {k: u + spec.noise_amplitude * self.noise[ENCODER_PREFIX + k][l] for k, u in self.disp.items()}
        self.mean = {k: (1 - a) * m + a * self.disp[k] for k, m in self.mean.items()}

    def direction(self) -> Params:
        """The encoder's part of ``d``: ``−s (μ − θ)``, or the chain-average of its own gradient."""
        if self.spec.adapt == "all":
            return {k: -self.spec.scale * m for k, m in self.mean.items()}
        (grad,) = self.pull(self.cotangent)
        return grad


def _head_step(head: HeadState, feats: Tensor, logits_grad: Tensor, spec: ChainSpec, noise: Optional[Params],
               l: int) -> HeadState:
    """Step ``ℓ`` of the head by the head primitives: the coupling, the gradient, the noise."""
    if spec.gamma:
        head = head_shrink(head, 1.0 - spec.lr * spec.gamma)
    head = head_write(head, feats, -spec.lr * logits_grad)
    if spec.noise:
        amp = spec.noise_amplitude
        head = head_add_noise(head, amp * noise[HEAD_WEIGHT][l], amp * noise[HEAD_BIAS][l])
    return head


def run_chain(
    model: BilevelModel, params: Params, x: Tensor, y: Tensor, spec: ChainSpec,
    noise: Optional[Params] = None, record: bool = False, recompute: bool = False,
) -> ChainResult:
    """Run the chain of ``spec`` on one task's batch ``(x, y)`` (module docstring).

    ``noise`` holds standard normal draws ``[L, *shape]`` for every adapted parameter (required
    when ``ε > 0``); ``record`` keeps every step for :func:`decompose_chain`, each with its encoder
    VJP held (the step's activations) or, with ``recompute``, re-run from ``θ'_{ℓ−1}`` when pulled.
    """
    if spec.noise and noise is None:
        raise ValueError("a chain with noise > 0 needs its standard normal draws (noise=...)")
    w0, b0 = params[HEAD_WEIGHT], params[HEAD_BIAS]
    head, a = init_head(w0, b0), spec.ema
    mean_w, mean_b = torch.zeros_like(w0), torch.zeros_like(b0)
    encoder = _EncoderChain(model, encoder_part(params), x, spec, noise)
    losses, accs, steps = [], [], []
    for l in range(spec.steps):
        feats, pull, point = encoder.features_at_step()
        logits = readout(feats, head.weight, head.bias)
        logits_grad = cross_entropy_logits_grad(logits, y)
        losses.append(cross_entropy(logits, y))
        accs.append(accuracy(logits, y))
        if record:
            held = _recomputed_pullback(model, point, x) if recompute and point is not None else pull
            steps.append(ChainStep(head, feats, logits, logits_grad, held))
        encoder.advance(l, logits_grad @ head.weight, pull)
        head = _head_step(head, feats, logits_grad, spec, noise, l)
        disp_w, disp_b = head_displacement(head)
        mean_w = (1 - a) * mean_w + a * disp_w
        mean_b = (1 - a) * mean_b + a * disp_b
    direction = with_encoder({HEAD_WEIGHT: -spec.scale * mean_w, HEAD_BIAS: -spec.scale * mean_b}, encoder.direction())
    direction = {k: direction[k] for k in params}
    return ChainResult(direction, torch.stack(losses).mean(), torch.stack(accs).mean(), tuple(steps))


def _recomputed_pullback(model: BilevelModel, point: Params, x: Tensor) -> Callable:
    """The VJP of ``φ(·, x)`` at ``point``, its forward re-run at each call (nothing held but ``point``)."""
    return lambda cotangent: vjp(lambda e: model.encode(e, x), point)[1](cotangent)


def chain_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, batches: str):
    """The chain's batch ``B``; ``pooled`` concatenates along the sample axis, support first."""
    if batches == "support":
        return support_x, support_y
    if batches == "query":
        return query_x, query_y
    if batches == "pooled":
        dim = support_y.dim() - 1
        return torch.cat([support_x, query_x], dim), torch.cat([support_y, query_y], dim)
    raise ValueError(f"batches must be one of {BATCHES}, got {batches!r}")


def draw_noise(generator: torch.Generator, params: Params, spec: ChainSpec, tasks: int) -> Params:
    """Standard normal draws ``[tasks, L, *shape]`` for every adapted parameter, in sorted key order."""
    ref = params[HEAD_WEIGHT]
    return {
        k: torch.randn((tasks, spec.steps, *params[k].shape), generator=generator, dtype=ref.dtype, device=ref.device)
        for k in sorted(params) if spec.adapted(k)
    }
