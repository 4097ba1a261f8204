"""iMAML (Rajeswaran et al., 2019) as a composition of engine pieces (docs/theory.md §5).

Inner problem: ``φ* = argmin_φ L_S(φ) + (λ/2)‖φ − φ_0‖²`` over the adapted set, solved by
``inner_steps`` gradient-descent steps of size ``inner_lr``
(:func:`bilevel.implicit.proximal_solve`). Meta-gradient: the implicit one of
:mod:`bilevel.implicit`, ``u = (I + H/λ)^{-1} ∇_φ L_Q(φ*)`` by ``cg_iters`` CG iterations
(H: Hessian of the unregularised support loss at φ*), evaluated at whatever point the
inner solver returned.

- ``adapt="head"`` (default): ``φ = (W, b)``; the encoder is not regularised, so its total
  derivative carries the mixed term ``dL_Q/dθ = ∂_θ L_Q − (∂²L_S/∂θ∂W) u/λ`` (one CG solve
  serves both), and the head's meta-gradient is ``u = λ (λI + H_WW)^{-1} ∇_W L_Q`` (W* depends
  on W_0 only through the proximal term). Default because the head problem is strongly
  convex (cross-entropy is convex in ``(W, b)``, plus ``λ/2‖·‖²``): gradient descent
  converges to the unique φ*, ``λI + H`` is SPD so CG converges, and the implicit function
  theorem's assumptions hold — none of which is guaranteed for the non-convex full-network
  problem — and ``H`` has only ``N(d + 1)`` dimensions.
- ``adapt="all"``: ``φ`` is every parameter; the meta-gradient is ``u`` itself.

Decomposition (``meta_grad(..., decompose=True)``). Stationarity of the head block gives
``W* − W_0 = A*ᵀ Φ_S`` with ``A* = −G_S*/λ`` (``Φ_S`` the support features at φ*, which are
the adapted encoder's in ``all`` mode), so the trace has the single entry ``(Φ_S, A*)`` and
its noise slot holds the solver's residual ``R = W* − W_0 − A*ᵀΦ_S`` (and ``b* − b_0 − A*ᵀ1``),
reported as the ``solver_residual`` term; eq. (1) then holds to round-off. Every term's node
cotangents (:func:`bilevel.decompose.term_cotangents`) are pulled back to ``(x, φ*)``
(``x`` = features in ``head`` mode, nothing in ``all`` mode) through the nodes
``(φ_q, Φ_S, A*(Φ_S, W*, b*))`` and mapped to the meta-parameters by the same implicit VJP as
the meta-gradient (one CG solve per term, batched with ``vmap``); the init term also carries
the head's direct readout gradient. For both adapted sets this is exact: the linearised
stationarity ``dF = 0`` that defines the implicit derivative implies
``dW* = dW_0 + d(A*ᵀΦ_S)`` and ``dR = 0``, so the terms sum to the implicit meta-gradient up to
the CG error, at any inner solution (converged or not). With ``damping``/``lam_offset`` the
map is no longer the implicit derivative and the identity error measures the difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils import _pytree as pytree

from bilevel.algorithm import AlgorithmConfig, BilevelAlgorithm, MetaStep, register
from bilevel.decompose import (
    Decomposition,
    Nodes,
    class_masks,
    cosine_matrix,
    identity_error,
    pair_weights,
    readout_head_gradient,
    reconstruction_error,
    stack_nodes,
    term_cotangents,
)
from bilevel.execution import map_meta_steps, map_tasks, reduce_tasks
from bilevel.head import HeadTrace, readout
from bilevel.implicit import implicit_vjp, linearize_stationarity, proximal_solve, stationarity_residual
from bilevel.inner import ADAPTED_SETS, InnerResult
from bilevel.losses import accuracy, cross_entropy, cross_entropy_logits_grad
from bilevel.params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, tree_detach
from bilevel.validate import AT_LEAST_1, INNER_LOOP, NON_NEGATIVE, POSITIVE, Check


@dataclass
class IMAMLConfig(AlgorithmConfig):
    """``inner_steps`` T and ``inner_lr`` α of the proximal gradient descent, proximal
    strength ``lam`` λ, ``cg_iters`` CG iterations, ``adapt`` in {head, all}; ``damping`` c and
    ``lam_offset`` e select the system ``((1 + c) I + H/(λ + e)) u = g`` (0, 0: the paper's;
    the authors' code uses e = 10)."""

    checks: ClassVar[dict[str, Check]] = {
        **INNER_LOOP, "lam": POSITIVE, "cg_iters": AT_LEAST_1, "damping": NON_NEGATIVE, "lam_offset": NON_NEGATIVE,
    }

    name: str = "imaml"
    inner_steps: int = 10
    inner_lr: float = 0.05
    lam: float = 2.0
    cg_iters: int = 5
    adapt: str = "head"
    damping: float = 0.0
    lam_offset: float = 0.0


def _validate(config: IMAMLConfig) -> None:
    if config.adapt not in ADAPTED_SETS:
        raise ValueError(f"adapt must be one of {ADAPTED_SETS}, got {config.adapt!r}")
    if not config.lam > 0:
        raise ValueError(f"lam (proximal strength λ) must be > 0, got {config.lam}")
    if config.cg_iters < 1:
        raise ValueError(f"cg_iters must be >= 1, got {config.cg_iters}")
    if config.inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {config.inner_steps}")
    if not config.inner_lr > 0:
        raise ValueError(f"inner_lr must be > 0, got {config.inner_lr}")
    if config.damping < 0 or config.lam_offset < 0:
        raise ValueError(
            f"damping and lam_offset must be >= 0, got damping={config.damping}, lam_offset={config.lam_offset}"
        )


@register("imaml")
class IMAML(BilevelAlgorithm):
    """Implicit MAML over the head (default) or the whole network; see the module docstring."""

    Config = IMAMLConfig
    terms = ("contrastive", "init", "coefficient", "solver_residual")
    splits_contrastive = True
    executions = ("vmap", "loop")

    def __init__(self, model, config: IMAMLConfig) -> None:
        _validate(config)
        super().__init__(model, config)

    # ----------------------------------------------------------------------------- meta-gradient
    def meta_grad(self, params: Params, batch: Any, decompose: bool = False) -> MetaStep:
        def make_fn(d: bool):
            return lambda p, xs, ys, xq, yq: self._task_step(p, xs, ys, xq, yq, d)

        per_task = map_meta_steps(
            make_fn, self.execution, tree_detach(params), batch.support_x, batch.support_y, batch.query_x,
            batch.query_y, decompose=decompose,
        )
        out = {k: reduce_tasks(k, v) for k, v in per_task.items()}
        decomposition = None
        if decompose:
            terms = {t: {k: v[i] for k, v in out["terms"].items()} for i, t in enumerate(self.terms)}
            decomposition = Decomposition(
                terms=terms,
                total=out["grad"],
                pair_weights=out["pairs"],
                feature_cosines=out["cosines"],
                same_class=class_masks(batch.support_y, batch.query_y),
                reconstruction_error=out["reconstruction"],
                identity_error=identity_error(terms, out["grad"]),
            )
        extras = {"imaml/cg_residual": out["cg_residual"], "imaml/stationarity": out["stationarity"]}
        return MetaStep(out["grad"], out["loss"], out["accuracy"], decomposition, extras)

    def _task_step(self, params: Params, xs, ys, xq, yq, decompose: bool) -> dict[str, Any]:
        cfg = self.config
        head_only = cfg.adapt == "head"
        if head_only:
            (phi_s, phi_q), encoder_pull = vjp(
                lambda e: (self.model.encode(e, xs), self.model.encode(e, xq)), encoder_part(params)
            )
            solution = proximal_solve(self.model, params, None, ys, steps=cfg.inner_steps, lr=cfg.inner_lr,
                                      lam=cfg.lam, adapt="head", support_features=phi_s)
            outer: Any = (phi_s, phi_q)
            anchor = {HEAD_WEIGHT: params[HEAD_WEIGHT], HEAD_BIAS: params[HEAD_BIAS]}
        else:
            solution = proximal_solve(self.model, params, xs, ys, steps=cfg.inner_steps, lr=cfg.inner_lr,
                                      lam=cfg.lam, adapt="all")
            outer, anchor = (), params
        inner = _adapted(solution, head_only)

        def features(x: Any, phi: Params) -> tuple[Tensor, Tensor]:
            if head_only:
                return x
            encoder = encoder_part(phi)
            return self.model.encode(encoder, xs), self.model.encode(encoder, xq)

        def support_loss(x: Any, phi: Params) -> Tensor:
            return cross_entropy(readout(features(x, phi)[0], phi[HEAD_WEIGHT], phi[HEAD_BIAS]), ys)

        def forward(x: Any, phi: Params):
            feats_s, feats_q = features(x, phi)
            logits = readout(feats_q, phi[HEAD_WEIGHT], phi[HEAD_BIAS])
            support_grad = cross_entropy_logits_grad(readout(feats_s, phi[HEAD_WEIGHT], phi[HEAD_BIAS]), ys)
            nodes = Nodes(feats_q, (feats_s,), (-support_grad / cfg.lam,))
            return (cross_entropy(logits, yq), nodes), logits

        (loss, nodes), pull, logits = vjp(forward, outer, inner, has_aux=True)
        support_grad, linearization = linearize_stationarity(support_loss, outer, inner)
        solve = partial(implicit_vjp, linearization, lam=cfg.lam, cg_iters=cfg.cg_iters,
                        damping=cfg.damping, lam_offset=cfg.lam_offset)

        def meta_gradient(x_bar: Any, phi_bar: Params) -> tuple[Params, Tensor]:
            implicit = solve(phi_bar)
            x_total = pytree.tree_map(torch.add, x_bar, implicit.outer)
            grad = dict(implicit.anchor)
            if head_only:
                (enc_grad,) = encoder_pull(x_total)
                grad.update({ENCODER_PREFIX + k: v for k, v in enc_grad.items()})
            return grad, implicit.residual_norms

        zero_nodes = pytree.tree_map(torch.zeros_like, nodes)
        grad, norms = meta_gradient(*pull((torch.ones_like(loss), zero_nodes)))
        out: dict[str, Any] = {
            "grad": grad,
            "loss": loss,
            "accuracy": accuracy(logits, yq),
            "cg_residual": norms[-1] / norms[0].clamp_min(torch.finfo(norms.dtype).tiny),
            "stationarity": stationarity_residual(support_grad, inner, anchor, cfg.lam),
        }
        if decompose:
            out.update(self._decompose(params, inner, nodes, logits, yq, pull, meta_gradient))
        return out

    def _decompose(self, params: Params, inner: Params, nodes: Nodes, logits: Tensor, yq: Tensor,
                   pull, meta_gradient) -> dict[str, Any]:
        """Per-task terms: node cotangents → ``(x̄, φ̄)`` → implicit map, batched over terms."""
        phi_q, (phi_s,), (coeff,) = nodes
        weight0, bias0 = params[HEAD_WEIGHT], params[HEAD_BIAS]
        trace = HeadTrace(
            weight0, bias0, (phi_s,), (coeff,),
            inner[HEAD_WEIGHT] - weight0 - coeff.transpose(-1, -2) @ phi_s,
            inner[HEAD_BIAS] - bias0 - coeff.sum(-2),
        )
        logits_grad = cross_entropy_logits_grad(logits, yq)
        cotangents = term_cotangents(trace, phi_q, logits_grad, self.terms)
        stacked = stack_nodes([cotangents[t] for t in self.terms])
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        term_grads, _ = vmap(lambda c: meta_gradient(*pull((zero, c))))(stacked)
        head_w, head_b = readout_head_gradient(phi_q, logits_grad)
        is_init = (torch.arange(len(self.terms), device=logits.device) == self.terms.index("init")).to(logits.dtype)
        term_grads[HEAD_WEIGHT] = term_grads[HEAD_WEIGHT] + is_init[:, None, None] * head_w
        term_grads[HEAD_BIAS] = term_grads[HEAD_BIAS] + is_init[:, None] * head_b
        return {
            "terms": term_grads,
            "pairs": pair_weights(trace, logits_grad),
            "cosines": cosine_matrix(phi_s, phi_q),
            "reconstruction": reconstruction_error(trace, phi_q, logits),
        }

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, params: Params, batch: Any, steps: int) -> Tensor:
        """Query accuracy of every task after ``0 … steps`` steps of the proximal solver
        (``[tasks, steps + 1]``). Head-only: the head state continues step by step (its trace
        keeps the anchor ``W_0``); full network: each count restarts from the meta-parameters
        (the solver anchors the encoder at its starting point), ``steps (steps + 1)/2`` inner
        steps in all."""
        fn = lambda p, xs, ys, xq, yq: self._evaluate_task(p, xs, ys, xq, yq, steps)  # noqa: E731
        return map_tasks(fn, self.execution, tree_detach(params), batch.support_x, batch.support_y,
                         batch.query_x, batch.query_y)

    def _evaluate_task(self, params: Params, xs, ys, xq, yq, steps: int) -> Tensor:
        cfg = self.config
        solve = partial(proximal_solve, self.model, params, lr=cfg.inner_lr, lam=cfg.lam, adapt=cfg.adapt)
        accs = []
        if cfg.adapt == "head":
            encoder = encoder_part(params)
            phi_s, phi_q = self.model.encode(encoder, xs), self.model.encode(encoder, xq)
            head = solve(None, ys, steps=0, support_features=phi_s).head
            for t in range(steps + 1):
                if t:
                    head = solve(None, ys, steps=1, support_features=phi_s, head=head).head
                accs.append(accuracy(readout(phi_q, head.weight, head.bias), yq))
        else:
            for t in range(steps + 1):
                solution = solve(xs, ys, steps=t)
                phi_q = self.model.encode(solution.encoder, xq)
                accs.append(accuracy(readout(phi_q, solution.head.weight, solution.head.bias), yq))
        return torch.stack(accs)


def _adapted(solution: InnerResult, head_only: bool) -> Params:
    """φ* as a parameter dict: the head, plus the (prefixed) encoder when it is adapted."""
    head = {HEAD_WEIGHT: solution.head.weight, HEAD_BIAS: solution.head.bias}
    if head_only:
        return head
    return {**{ENCODER_PREFIX + k: v for k, v in solution.encoder.items()}, **head}
