"""Inner optimisers as small steps chained together, each touching the head only through the head primitives.

An inner step reads the support cross-entropy's gradient at the current point
(:func:`support_gradient`): the encoder's ``g_θ`` and, for the head, ``G_t = ∂L_S/∂Z_S`` on the
step's support features ``Φ_t`` — the head's gradient in trace form (``∇_W L_S = G_tᵀ Φ_t``,
``∇_b L_S = G_tᵀ 1``). A chain of :class:`InnerStep` values turns it into the step's
:class:`Direction` ``D``, as optax chains gradient transformations, and :func:`move` goes
``x ← x − α D``:

    θ ← θ − α D_θ
    W ← W_0 + (1 − α c)(W − W_0) − α (Σ_τ D_τᵀ Φ_τ + D_ξ) − α D_tᵀ Φ_t     (b: 1 for Φ)

``D_t`` (``coeff``) is the new entry's coefficient direction; ``c`` (``pull``) a multiple of the
head's displacement ``W − W_0 = Σ_τ A_τᵀ Φ_τ + ξ`` (:func:`~bilevel.primitives.head.head_shrink`
scales every earlier ``A_τ`` and ``ξ``); ``D_τ``, ``D_ξ`` (``entries``, ``noise``) explicit
directions of the earlier entries and the noise slot
(:func:`~bilevel.primitives.head.head_adjust`). Each part is a coefficient on features the trace
already holds, so whatever the chain the adapted head is eq. (1) of docs/theory.md and the
decomposition stays exact. The step size ``α`` (``rate``; ``encoder_rate`` per encoder key) is
set once, by a rate step, and applied in :func:`move`.

The steps: :func:`proximal` (the pull ``λ (x − x_0)``), :func:`momentum` (heavy ball, its velocity
in trace form), :func:`rate` (a fixed α), :func:`learned_rates` (rates that are meta-parameters:
Meta-SGD), :func:`frozen_head` (the head stays where it starts: BOIL); :func:`chain_steps` composes them
and :func:`descend` runs ``T`` steps of a chain on a :class:`~bilevel.solvers.support.Support`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from bilevel.primitives.head import HeadState, HeadTrace, head_adjust, head_shrink, head_write, readout
from bilevel.primitives.losses import cross_entropy_logits_grad
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params, encoder_part, tree_detach
from bilevel.solvers.pullback import encoder_pullback
from bilevel.solvers.support import InnerConfig, InnerResult, Support

Rate = Union[float, Tensor]


class Point(NamedTuple):
    """Where the inner loop is: the encoder ``θ_t`` (un-prefixed keys), the head ``W_t`` with its
    trace, and the meta-parameters ``params`` the loop started from (``θ_0`` and the algorithm's own)."""

    encoder: Params
    head: HeadState
    params: Params


class Direction(NamedTuple):
    """One step's direction ``D`` (module docstring): ``encoder`` ``D_θ`` (None: the encoder does not
    adapt), the step's ``features`` ``Φ_t``, ``coeff`` ``D_t`` (None: the head does not move),
    ``pull`` ``c``, ``entries``/``noise`` (None: none) and the step size ``rate`` (None: not set yet)."""

    encoder: Optional[Params]
    features: Tensor
    coeff: Optional[Tensor]
    pull: float = 0.0
    entries: Optional[tuple[Tensor, ...]] = None
    noise: Optional[tuple[Tensor, Tensor]] = None
    rate: Optional[Rate] = None
    encoder_rate: Optional[Params] = None

    def earlier(self, trace: HeadTrace) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor]]:
        """The earlier entries' and the noise slot's directions written out: ``c A_τ + D_τ``, ``c ξ + D_ξ``."""
        entries = tuple(self.pull * a for a in trace.coeffs)
        noise = (self.pull * trace.noise_weight, self.pull * trace.noise_bias)
        if self.entries is None:
            return entries, noise
        return tuple(e + d for e, d in zip(entries, self.entries)), (noise[0] + self.noise[0], noise[1] + self.noise[1])

    def with_rate(self, rate: Rate, encoder_rate: Optional[Params] = None) -> "Direction":
        """The direction with its step size: ``rate`` for the head (a scalar, so the head's step
        stays ``AᵀΦ``) and the encoder, unless ``encoder_rate`` gives the encoder's key by key."""
        if self.rate is not None:
            raise ValueError("the update rule sets the step size twice (one rate step per chain)")
        return self._replace(rate=rate, encoder_rate=encoder_rate)


class InnerStep(NamedTuple):
    """A piece of an update rule: ``init(point) -> state`` when the loop starts and
    ``update(direction, state, point) -> (direction, state)`` at every step. ``restartable``: the
    update reads nothing but the point, so a loop restarted from an adapted point (``θ_t`` in
    ``params``, a fresh head at ``W_t``) continues it exactly — what step-by-step evaluation and
    ``memory=recompute`` rely on (a velocity, a step counter or an anchor at ``x_0`` is not)."""

    init: Callable[[Point], Any]
    update: Callable[[Direction, Any, Point], tuple[Direction, Any]]
    restartable: bool = True


def chain_steps(*steps: InnerStep) -> InnerStep:
    """The steps one after the other, each seeing the direction the one before made."""

    def update(direction: Direction, states: tuple, point: Point) -> tuple[Direction, tuple]:
        new = []
        for step, state in zip(steps, states):
            direction, state = step.update(direction, state, point)
            new.append(state)
        return direction, tuple(new)

    return InnerStep(lambda point: tuple(s.init(point) for s in steps), update, all(s.restartable for s in steps))


def proximal(lam: float) -> InnerStep:
    """Add the pull ``λ (x − x_0)`` towards where the loop started: ``λ (θ_t − θ_0)`` on the
    encoder, ``λ (W − W_0)`` on the head (``pull``). Gradient descent with it minimises
    ``L_S + (λ/2)‖x − x_0‖²``, iMAML's inner problem."""

    def update(d: Direction, anchor: Params, point: Point) -> tuple[Direction, Params]:
        encoder = d.encoder
        if encoder is not None:
            encoder = {k: g + lam * (point.encoder[k] - anchor[k]) for k, g in encoder.items()}
        return d._replace(encoder=encoder, pull=d.pull + lam), anchor

    return InnerStep(lambda point: encoder_part(point.params), update, restartable=False)


def momentum(mu: float) -> InnerStep:
    """Heavy ball, ``v ← μ v + D`` and ``D ← v``: the encoder's velocity key by key, the head's in
    trace form (one block per entry, the earlier entries' directions written out, and the noise
    slot), so ``−α v`` is a coefficient update of the entries and eq. (1) keeps holding."""

    def init(point: Point) -> tuple:
        head = point.head
        return ({k: torch.zeros_like(v) for k, v in point.encoder.items()}, (),
                (torch.zeros_like(head.weight), torch.zeros_like(head.bias)))

    def update(d: Direction, state: tuple, point: Point) -> tuple[Direction, tuple]:
        enc_v, head_v, noise_v = state
        if d.encoder is not None:
            enc_v = {k: mu * enc_v[k] + g for k, g in d.encoder.items()}
            d = d._replace(encoder=enc_v)
        if d.coeff is None:
            return d, (enc_v, head_v, noise_v)
        entries, noise = d.earlier(point.head.trace)
        head_v = tuple(mu * v + e for v, e in zip(head_v, entries)) + (d.coeff,)
        noise_v = (mu * noise_v[0] + noise[0], mu * noise_v[1] + noise[1])
        return d._replace(coeff=head_v[-1], pull=0.0, entries=head_v[:-1], noise=noise_v), (enc_v, head_v, noise_v)

    return InnerStep(init, update, restartable=False)


def rate(lr: Optional[Rate]) -> InnerStep:
    """The step size ``α = lr`` of the whole direction (None, a loop without one, is refused when it runs)."""

    def update(d: Direction, state: None, point: Point) -> tuple[Direction, None]:
        if lr is None:
            raise ValueError("rate(None): this inner loop has no step size (its InnerConfig.lr is None)")
        return d.with_rate(lr), state

    return InnerStep(lambda point: None, update)


def learned_rates(read: Callable[[Params], tuple[Params, Rate]]) -> InnerStep:
    """Step sizes that are meta-parameters (Meta-SGD): ``read(params)`` gives the encoder's, key by
    key (broadcasting against each key's tensor: per element), and the head's, one scalar."""
    return InnerStep(lambda point: read(point.params), lambda d, rates, point: (d.with_rate(rates[1], rates[0]), rates))


def frozen_head() -> InnerStep:
    """The head stays where it starts (BOIL): the direction keeps only its encoder part."""
    return InnerStep(lambda point: None, lambda d, state, point: (d._replace(coeff=None), state))


def support_gradient(model: BilevelModel, point: Point, support: Support, inner: InnerConfig) -> Direction:
    """The support cross-entropy's gradient at ``point`` over the adapted set, the head's in trace
    form (``support.features`` are given when only the head adapts); held constant at first order."""
    head = point.head
    if inner.adapt == "all":
        feats, pull_back = encoder_pullback(model, point.encoder, support.images, create_graph=not inner.first_order)
    else:
        feats = support.features
    logits_grad = cross_entropy_logits_grad(readout(feats, head.weight, head.bias), support.labels)
    encoder = None
    if inner.adapt == "all":
        (encoder,) = pull_back(logits_grad @ head.weight)
        encoder = tree_detach(encoder) if inner.first_order else encoder
    if inner.first_order:
        logits_grad, feats = logits_grad.detach(), feats.detach()
    return Direction(encoder, feats, logits_grad)


def move(point: Point, d: Direction) -> Point:
    """``x ← x − α D`` (module docstring): the encoder key by key, the head by the head primitives."""
    if d.rate is None:
        raise ValueError("the update rule sets no step size: end its chain with a rate step (rate, learned_rates)")
    encoder, head = point.encoder, point.head
    if d.encoder is not None:
        rates = d.encoder_rate
        encoder = {k: v - (d.rate if rates is None else rates[k]) * d.encoder[k] for k, v in encoder.items()}
    if d.coeff is not None:
        if d.pull:
            head = head_shrink(head, 1.0 - d.rate * d.pull)
        if d.entries is None:
            head = head_write(head, d.features, -d.rate * d.coeff)
        else:
            head = head_write(head, d.features, torch.zeros_like(d.coeff))
            head = head_adjust(head, tuple(-d.rate * v for v in d.entries + (d.coeff,)),
                               -d.rate * d.noise[0], -d.rate * d.noise[1])
    return point._replace(encoder=encoder, head=head)


def descend(model: BilevelModel, params: Params, support: Support, inner: InnerConfig, rule: InnerStep) -> InnerResult:
    """``inner.steps`` steps of the update rule ``rule`` on ``support``, from the encoder of ``params``
    and ``support.start(params)``; with ``adapt="head"`` the support features are computed once
    (or taken from ``support``) and the encoder stays."""
    encoder = encoder_part(params)
    head = support.start(params)
    if inner.adapt == "head":
        support = support._replace(features=support.encode(model, encoder))
    point = Point(encoder, head, params)
    state, path = rule.init(point), []
    for _ in range(inner.steps):
        path.append(point.encoder)
        direction, state = rule.update(support_gradient(model, point, support, inner), state, point)
        point = move(point, direction)
    return InnerResult(point.encoder, point.head, tuple(path))
