"""Proximal inner problems and their implicit hypergradients (docs/theory.md §5).

Inner problem over the adapted variables ``φ`` (``adapt="head"``: ``(W, b)``;
``adapt="all"``: every parameter), anchored at ``φ_0`` (the meta-parameters' copy of
``φ``) and depending on outer variables ``x`` (``head``: the encoder's features; ``all``:
none):

    φ*(x, φ_0) = argmin_φ  L_S(x, φ) + (λ/2)‖φ − φ_0‖²
    stationarity  F = ∇_φ L_S(x, φ*) + λ (φ* − φ_0) = 0

Implicit function theorem (H = ∇²_φ L_S at φ*, the *unregularised* support Hessian):

    dφ*/dφ_0 = λ (λI + H)^{-1},     dφ*/dx = −(λI + H)^{-1} ∂²L_S/∂φ∂x

so a cotangent ``φ̄`` on ``φ*`` maps to

    φ̄_0 = u,   x̄ = −(∂²L_S/∂x∂φ) u/λ,   with   (I + H/λ) u = φ̄          (paper's system)

``u`` is computed by conjugate gradient with Hessian-vector products of a linearisation
taken once (``torch.func.vjp`` of ``∇_φ L_S``, which also yields the mixed term). The
damped variant of the authors' code, ``((1 + c) I + H/(λ + e)) u = φ̄`` (and ``x̄`` with
``u/(λ + e)``), is available through ``damping = c`` and ``lam_offset = e``; both default
to 0 (the paper). The identity ``dW*/dp = dW_0 + d(A*ᵀΦ)`` used by the decomposition is
the linearised stationarity ``dF = 0``, so it holds for the undamped system at whatever
point ``φ*`` the solver returned, once CG has converged.

**Exact at any solver budget.** Write ``M = I + H/λ`` for the stationarity system and ``P`` for
the map the solver applies (``P ≈ M⁻¹``: a truncated CG run, or the damped system's). The
decomposition pulls each term's node cotangent back to ``(x̄_k, φ̄_k)`` and maps it with the *same*
fixed ``P`` — the CG polynomial of the plain run (:func:`~bilevel.primitives.cg.cg_polynomial`), linear — and
the ``init`` term also carries the readout gradient ``h`` (the plain cotangent's head part)
straight to the anchor. The node cotangents of all terms sum to ``φ̄ = v − M h`` (the linearised
stationarity, which holds exactly at any ``φ*``), so the terms sum to
``P v + (I − P M) h`` on the anchor where the meta-gradient is ``P v``. The difference is the
``solve_error`` term,

    anchor:  P M h − h,        x:  −(∂²L_S/∂x∂φ)(P M h/(λ + e) − h/λ)

zero when the solver inverts ``M`` on ``h`` (converged CG, no damping), and with it the terms sum
to the meta-gradient to round-off, whatever ``cg_iters``. It costs one CG-polynomial
application and two linearisation products per task.

**Precision.** With ``adapt="head"``, everything between the inner solver and the encoder — the
query forward's VJP, the stationarity's linearisation, CG, every term's right-hand side and
``solve_error`` — runs in ``SOLVE_DTYPE`` (float64) at the solver's point, whatever the model's
dtype; the encoder's VJP (the costly part) stays in the model's dtype, one linear map shared by the
meta-gradient and its terms. The reason is cancellation: on trained features ``‖H h‖/λ`` reaches
12 ``‖h‖`` (``M = I + H/λ``), and the terms carry pieces of size ``‖M h‖`` that cancel to ``‖h‖``;
done in float32 this left identity errors of 7.5e-5 to 1e-2 on trained parameters
(docs/theory.md §5). These are ``[n, d]`` tensors, so it costs nothing measurable. With ``adapt="all"`` the system spans the whole network
and float64 would triple the step: it runs in the model's dtype. A float64 model computes exactly
what it computed before.
"""
from __future__ import annotations

from abc import abstractmethod
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad, vjp
from torch.utils import _pytree as pytree

from bilevel.primitives.cg import cg_polynomial, conjugate_gradient
from bilevel.data.batch import TaskBatch
from bilevel.decomposition.cotangents import Nodes
from bilevel.execution.mapping import map_tasks
from bilevel.primitives.head import HeadTrace, readout
from bilevel.hypergrad.rows import Forward, node_rows
from bilevel.decomposition.assembly import assemble, mean_over_tasks
from bilevel.decomposition.step import MetaStep, TaskResult, Want
from bilevel.hypergrad.inner import InnerLoopAlgorithm
from bilevel.solvers.proximal import proximal_solve
from bilevel.solvers.support import InnerConfig, InnerResult, Support
from bilevel.primitives.losses import cross_entropy, cross_entropy_logits_grad
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import (
    ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, is_head, tree_add, tree_detach, tree_map, tree_norm,
)

SOLVE_DTYPE = torch.float64
"""The dtype of a head-only system's linear algebra (module docstring, *Precision*)."""

SupportLoss = Callable[[Any, Params], Tensor]
"""``L_S(x, φ)``: the unregularised support loss of outer variables ``x`` and adapted ``φ``."""

Linearization = Callable[[Params], tuple[Any, Params]]
"""``w ↦ ((∂²L_S/∂x∂φ) w, H w)`` at the inner solution."""

Solver = Callable[[Params, Support], Params]
"""``(meta-parameters, support) ↦ φ*``: an inner solver of the proximal problem, ``φ*`` keyed as the
meta-parameters (the support's features are given, its images not, when only the head adapts)."""


class ImplicitSystem(NamedTuple):
    """The linear system of the implicit VJP: ``((1 + damping) I + H/(lam + lam_offset)) u = φ̄``
    by ``cg_iters`` CG iterations; ``lam`` λ is the proximal strength of the inner problem."""

    lam: float
    cg_iters: int
    damping: float = 0.0
    lam_offset: float = 0.0


class ImplicitProblem(NamedTuple):
    """What one task's implicit hypergradient needs besides the task: the ``model``, the inner
    solver ``solve`` (:data:`Solver`), the ``system`` and the adapted set ``adapt``."""

    model: BilevelModel
    solve: Solver
    system: ImplicitSystem
    adapt: str


class ImplicitVJP(NamedTuple):
    """Cotangents on the anchor ``φ_0`` and the outer variables ``x``, the CG residual norms
    (``[cg_iters + 1]``) and the CG step sizes (the polynomial ``P`` to apply to other cotangents)."""

    anchor: Params
    outer: Any
    residual_norms: Tensor
    alphas: Tensor
    betas: Tensor


def linearize_stationarity(support_loss: SupportLoss, outer: Any, inner: Params) -> tuple[Params, Linearization]:
    """``∇_φ L_S(x, φ)`` at ``(outer, inner)`` and its linearisation ``w ↦ (x̄, H w)``
    (reverse-over-reverse; built once, reused by every CG iteration and right-hand side)."""
    return vjp(lambda x, phi: grad(support_loss, argnums=1)(x, phi), outer, inner)


def stationarity_residual(support_grad: Params, inner: Params, anchor: Params, lam: float) -> Tensor:
    """``‖∇_φ L_S(φ*) + λ (φ* − φ_0)‖`` (0 at the exact inner solution)."""
    return tree_norm({k: support_grad[k] + lam * (inner[k] - anchor[k]) for k in inner})


def _operator(linearization: Linearization, system: ImplicitSystem) -> Callable[[Params], Params]:
    lam_h = system.lam + system.lam_offset
    return lambda w: tree_add(tree_map(lambda t: (1.0 + system.damping) * t, w), linearization(w)[1], 1.0 / lam_h)


def _outer(linearization: Linearization, u: Params, lam: float) -> Any:
    """``−(∂²L_S/∂x∂φ) u/λ``: the outer variables' cotangent of an anchor cotangent ``u``."""
    mixed, _ = linearization(tree_map(lambda t: t / lam, u))
    return pytree.tree_map(lambda m: -m, mixed)


def implicit_vjp(
    linearization: Linearization, cotangent: Params, system: ImplicitSystem,
    polynomial: Optional[tuple[Tensor, Tensor]] = None,
) -> ImplicitVJP:
    """Map a cotangent on ``φ*`` to the anchor and the outer variables (module docstring): by CG,
    or, given the ``(alphas, betas)`` of an earlier run, by that run's fixed polynomial."""
    matvec = _operator(linearization, system)
    if polynomial is None:
        solved = conjugate_gradient(matvec, cotangent, system.cg_iters)
        solution, norms, alphas, betas = solved
    else:
        alphas, betas = polynomial
        solution, norms = cg_polynomial(matvec, cotangent, alphas, betas), alphas.new_zeros(0)
    outer = _outer(linearization, solution, system.lam + system.lam_offset)
    return ImplicitVJP(solution, outer, norms, alphas, betas)


def solve_error(linearization: Linearization, head_cotangent: Params, system: ImplicitSystem,
                polynomial: tuple[Tensor, Tensor]) -> tuple[Params, Any]:
    """The ``solve_error`` term on ``(anchor, x)`` (module docstring): ``P M h − h`` and
    ``−(∂²L_S/∂x∂φ)(P M h/(λ + e) − h/λ)``, ``M = I + H/λ``, ``h`` the readout gradient."""
    h = head_cotangent
    mixed_h, hess_h = linearization(h)
    p_mh = cg_polynomial(_operator(linearization, system), tree_add(h, hess_h, 1.0 / system.lam), *polynomial)
    outer = pytree.tree_map(lambda a, b: a + b / system.lam, _outer(linearization, p_mh, system.lam + system.lam_offset),
                            mixed_h)
    return tree_add(p_mh, h, -1.0), outer


class _Task:
    """One task's implicit problem at the solver's point: the outer variables ``x``, ``φ*``, the
    anchor ``φ_0`` and the initial head ``(W_0, b_0)``, in the solve dtype (module docstring)."""

    def __init__(self, problem: ImplicitProblem, params: Params, xs: Tensor, ys: Tensor, xq: Tensor,
                 yq: Tensor) -> None:
        self.problem, self.xs, self.ys, self.xq, self.yq = problem, xs, ys, xq, yq
        self.head_only = problem.adapt == "head"
        model, head0 = problem.model, {HEAD_WEIGHT: params[HEAD_WEIGHT], HEAD_BIAS: params[HEAD_BIAS]}
        if self.head_only:
            (phi_s, phi_q), self.encoder_pull = vjp(lambda e: (model.encode(e, xs), model.encode(e, xq)),
                                                    encoder_part(params))
            outer, inner, anchor = (phi_s, phi_q), problem.solve(params, Support(ys, features=phi_s)), head0
        else:
            outer, inner, anchor = (), problem.solve(params, Support(ys, images=xs)), params
        self.dtype = params[HEAD_WEIGHT].dtype
        wide = partial(pytree.tree_map, lambda t: t.to(SOLVE_DTYPE if self.head_only else self.dtype))
        self.outer, self.inner, self.head0, self.anchor = wide(outer), wide(inner), wide(head0), wide(anchor)

    def narrow(self, tree: Any) -> Any:
        """``tree`` in the model's dtype."""
        return pytree.tree_map(lambda t: t.to(self.dtype), tree)

    def features(self, x: Any, phi: Params) -> tuple[Tensor, Tensor]:
        """``(Φ_S, φ_q)``: the outer variables (head-only) or the encoder of ``φ`` on the images."""
        if self.head_only:
            return x
        encoder = encoder_part(phi)
        return self.problem.model.encode(encoder, self.xs), self.problem.model.encode(encoder, self.xq)

    def support_loss(self, x: Any, phi: Params) -> Tensor:
        """``L_S(x, φ)``, unregularised."""
        return cross_entropy(readout(self.features(x, phi)[0], phi[HEAD_WEIGHT], phi[HEAD_BIAS]), self.ys)

    def forward(self, x: Any, phi: Params, w0: Params):
        """The query loss and the nodes ``(φ_q, Φ_S, A* = −G_S*/λ, W_0, b_0)``; the trace's noise slot
        holds the solver's residual ``R = W* − W_0 − A*ᵀΦ_S`` (the ``solver_residual`` term)."""
        feats_s, feats_q = self.features(x, phi)
        logits = readout(feats_q, phi[HEAD_WEIGHT], phi[HEAD_BIAS])
        coeff = -cross_entropy_logits_grad(readout(feats_s, phi[HEAD_WEIGHT], phi[HEAD_BIAS]), self.ys)
        coeff = coeff / self.problem.system.lam
        trace = HeadTrace(
            w0[HEAD_WEIGHT], w0[HEAD_BIAS], (feats_s,), (coeff,),
            phi[HEAD_WEIGHT] - w0[HEAD_WEIGHT] - coeff.transpose(-1, -2) @ feats_s,
            phi[HEAD_BIAS] - w0[HEAD_BIAS] - coeff.sum(-2),
        )
        return (cross_entropy(logits, self.yq), Nodes.of(trace, feats_q)), (logits, trace)

    def to_meta(self, anchor_cot: Params, outer_cot: Any, head0_cot: Params) -> Params:
        """The meta-parameters' gradient, in the model's dtype, of cotangents on ``(φ_0, x, (W_0, b_0))``."""
        grad_ = {k: v + head0_cot[k] if is_head(k) else v for k, v in anchor_cot.items()}
        if self.head_only:
            (enc_grad,) = self.encoder_pull(self.narrow(outer_cot))
            grad_.update({ENCODER_PREFIX + k: v for k, v in enc_grad.items()})
        return self.narrow(grad_)

    def meta_gradient(self, linearization: Linearization, pulled: tuple[Any, Params, Params],
                      polynomial=None) -> tuple[Params, ImplicitVJP]:
        """The meta-gradient of the forward's pulled-back cotangent, by CG or a fixed CG polynomial."""
        x_bar, phi_bar, head0_bar = pulled
        implicit = implicit_vjp(linearization, phi_bar, self.problem.system, polynomial)
        return self.to_meta(implicit.anchor, pytree.tree_map(torch.add, x_bar, implicit.outer), head0_bar), implicit


def implicit_task(problem: ImplicitProblem, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
                  want: Want) -> TaskResult:
    """One task's implicit hypergradient around the inner solver ``problem.solve`` (module docstring).

    ``adapt="head"``: the outer variables are the encoder's features ``x = (Φ_S, φ_q)``, mapped to
    the encoder by one VJP; ``"all"``: ``φ`` is every parameter and there are none."""
    task = _Task(problem, params, xs, ys, xq, yq)
    (loss, nodes), pull, (logits, trace) = vjp(task.forward, task.outer, task.inner, task.head0, has_aux=True)
    support_grad, linearization = linearize_stationarity(task.support_loss, task.outer, task.inner)
    gradient = partial(task.meta_gradient, linearization)
    plain_pulled = pull((torch.ones_like(loss), nodes.zeros()))
    plain_grad, plain = gradient(plain_pulled)
    polynomial = (plain.alphas, plain.betas)
    direct = {}
    if "solve_error" in want.terms + (want.keep or ()):
        head_cot = {k: v if is_head(k) else torch.zeros_like(v) for k, v in plain_pulled[1].items()}
        anchor_err, outer_err = solve_error(linearization, head_cot, problem.system, polynomial)
        direct["solve_error"] = task.to_meta(anchor_err, outer_err, tree_map(torch.zeros_like, task.head0))
    forward_ = Forward(loss, logits, yq, nodes, trace, lambda c: gradient(pull(c), polynomial)[0])
    result = node_rows(forward_, want, grad=plain_grad, direct=direct)
    result = result._replace(**{f: task.narrow(getattr(result, f)) for f in TaskResult._fields
                                if f not in ("grad", "extras") and getattr(result, f) is not None})
    norms = plain.residual_norms
    return result._replace(grad=plain_grad, extras=task.narrow({
        "cg_residual": norms[-1] / norms[0].clamp_min(torch.finfo(norms.dtype).tiny),
        "stationarity": stationarity_residual(support_grad, task.inner, task.anchor, problem.system.lam),
    }))


class ImplicitAlgorithm(InnerLoopAlgorithm):
    """Base for algorithms whose meta-gradient is implicit around a solver of the proximal inner
    problem ``argmin_φ L_S(φ) + (λ/2)‖φ − φ_0‖²`` over the adapted set (``config.inner.adapt``).

    Subclasses implement :meth:`system` (λ and the CG budget) and may replace the solver,
    :meth:`inner_loop` (default: ``inner.steps`` proximal gradient-descent steps of size
    ``inner.lr``); the meta-gradient, its exact decomposition (with ``solve_error``), the execution
    paths and evaluation (the query accuracy after ``0 … steps`` solver steps, each count run from
    the start: the solver pulls towards where it starts) come with the base. Extras
    ``<name>/cg_residual`` (relative) and ``<name>/stationarity`` (``‖∇L_S + λ(φ* − φ_0)‖``) are
    means over tasks."""

    terms = ("contrastive", "init", "coefficient", "solver_residual", "solve_error")
    splits_contrastive = True
    executions = ("vmap", "loop")

    @abstractmethod
    def system(self) -> ImplicitSystem:
        """The implicit VJP's linear system."""

    def inner_loop(self, params: Params, support: Support, inner: InnerConfig) -> InnerResult:
        """``inner.steps`` gradient-descent steps of size ``inner.lr`` on the proximal problem with
        the system's λ (:func:`~bilevel.solvers.proximal.proximal_solve`: no graph is kept)."""
        return proximal_solve(self.model, params, support, inner, self.system().lam)

    def solution(self, params: Params, support: Support) -> Params:
        """``φ*`` keyed as the meta-parameters: the head's, and with ``adapt="all"`` the encoder's."""
        found = self.inner_loop(params, support, self.config.inner)
        head = {HEAD_WEIGHT: found.head.weight, HEAD_BIAS: found.head.bias}
        if self.config.inner.adapt == "head":
            return head
        return {**{ENCODER_PREFIX + k: v for k, v in found.encoder.items()}, **head}

    def meta_step(self, params: Params, batch: TaskBatch, want: Want = Want()) -> MetaStep:
        problem = ImplicitProblem(self.model, self.solution, self.system(), self.config.inner.adapt)

        def task(p, xs, ys, xq, yq) -> TaskResult:
            return implicit_task(problem, p, xs, ys, xq, yq, want)

        result = mean_over_tasks(map_tasks(task, self.execution, tree_detach(params), batch.support_x,
                                           batch.support_y, batch.query_x, batch.query_y))
        return assemble(result._replace(extras={f"{self.name}/{k}": v for k, v in result.extras.items()}), batch, want)
