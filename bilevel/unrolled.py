"""Hypergradients by backpropagation through an unrolled inner loop (MAML family).

The meta-gradient of one task is the VJP of ``L_Q(adapted(params))`` — second order
through every inner step, or first order with the inner gradients detached. The same
forward also outputs the decomposition nodes ``(φ_q, Φ_τ, A_τ)``, so a decomposition
costs one VJP per term on top of the plain backward (one batched VJP under ``vmap``; one
after the other on the per-task loop). The
meta-gradient a step returns does not depend on whether the decomposition is requested,
bit for bit: the loop's plain step runs on plain autograd, so a decomposition step there
takes its gradient from that plain step (:func:`~bilevel.execution.map_meta_steps`) and its
terms from a ``torch.func`` pass; the identity check compares them with the gradient the
step returns.

Execution paths: ``vmap`` and ``loop`` run the per-task function over tasks; ``shared``
(head-only inner loops) runs the encoder once over every support and query image of the
meta-batch, with per-task, per-set BatchNorm statistics through the layout, and batches
the head loops along a task axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from .algorithm import AlgorithmConfig, BilevelAlgorithm, MetaStep
from .decompose import (
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
from .execution import map_meta_steps, map_tasks, reduce_tasks, stack_trees
from .head import init_head, readout
from .inner import ADAPTED_SETS, InnerResult, autograd_pullbacks, sgd_steps
from .losses import accuracy, cross_entropy, cross_entropy_logits_grad
from .params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, is_head

ORDERS = ("second_order", "first_order")


@dataclass
class UnrolledConfig(AlgorithmConfig):
    """``inner_steps`` T, ``inner_lr`` α, ``inner_momentum`` μ (heavy ball; 0 = plain SGD),
    ``adapt`` in {all, head}, ``order`` in {second_order, first_order}."""

    inner_steps: int = 1
    inner_lr: float = 0.4
    inner_momentum: float = 0.0
    adapt: str = "all"
    order: str = "second_order"


def _zeros_like_nodes(nodes: Nodes) -> Nodes:
    return Nodes(
        torch.zeros_like(nodes.query_features),
        tuple(torch.zeros_like(f) for f in nodes.features),
        tuple(torch.zeros_like(a) for a in nodes.coeffs),
    )


def _sum_nodes(nodes: list[Nodes]) -> Nodes:
    return Nodes(
        sum(n.query_features for n in nodes),
        tuple(sum(f) for f in zip(*(n.features for n in nodes))),
        tuple(sum(a) for a in zip(*(n.coeffs for n in nodes))),
    )


class UnrolledAlgorithm(BilevelAlgorithm):
    """Base for algorithms whose hypergradient is backprop through ``inner_loop``.

    Subclasses may override :meth:`inner_loop` (any solver built from the head
    primitives); the decomposition, execution paths and evaluation come with the base.
    """

    Config = UnrolledConfig
    terms = ("contrastive", "init", "coefficient")
    splits_contrastive = True

    def __init__(self, model, config) -> None:
        if config.adapt not in ADAPTED_SETS:
            raise ValueError(f"adapt must be one of {ADAPTED_SETS}, got {config.adapt!r}")
        if config.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {config.order!r}")
        if config.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {config.inner_steps}")
        self.executions = ("vmap", "loop", "shared") if config.adapt == "head" else ("vmap", "loop")
        super().__init__(model, config)
        self.execution = "loop"

    @property
    def first_order(self) -> bool:
        return self.config.order == "first_order"

    def inner_loop(
        self, params: Params, support_x, support_y: Tensor, support_features=None, head=None,
        steps: int | None = None, first_order: bool | None = None,
    ) -> InnerResult:
        """The inner solver: ``inner_steps`` SGD steps with step ``inner_lr``."""
        return sgd_steps(
            self.model, params, support_x, support_y,
            steps=self.config.inner_steps if steps is None else steps,
            lr=self.config.inner_lr, momentum=self.config.inner_momentum, adapt=self.config.adapt,
            first_order=self.first_order if first_order is None else first_order,
            support_features=support_features, head=head,
        )

    # ----------------------------------------------------------------------------- meta-gradient
    def meta_grad(self, params: Params, batch: Any, decompose: bool = False) -> MetaStep:
        return self._meta_step(params, batch, decompose, keep=None)

    def ablated_meta_grad(self, params: Params, batch: Any, keep: tuple[str, ...]) -> MetaStep:
        """Two VJP rows of one forward: the plain row (for the head) and the sum of the kept
        terms' cotangents (for the encoder) — by linearity, the sum of the kept terms."""
        return self._meta_step(params, batch, False, keep=tuple(keep))

    def _meta_step(self, params: Params, batch: Any, decompose: bool, keep) -> MetaStep:
        if self.execution == "shared":
            out = self._shared_step(params, batch, decompose, keep)
        else:
            def make_fn(d: bool):
                return lambda p, xs, ys, xq, yq: self._task_step(p, xs, ys, xq, yq, d, keep)

            per_task = map_meta_steps(
                make_fn, self.execution, params, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                decompose=decompose,
            )
            out = {k: reduce_tasks(k, v) for k, v in per_task.items()}
        decomposition = self._assemble(out, batch) if decompose else None
        return MetaStep(out["grad"], out["loss"], out["accuracy"], decomposition)

    def _task_step(self, params, xs, ys, xq, yq, decompose: bool, keep=None) -> dict[str, Any]:
        if self.config.adapt == "head":
            encode = lambda e: (self.model.encode(e, xs), self.model.encode(e, xq))  # noqa: E731
            return self._backward(self._head_forward(ys, yq, None), params, yq, decompose, keep, encode=encode)

        def forward(p):
            inner = self.inner_loop(p, xs, ys)
            phi_q = self.model.encode(inner.encoder, xq)
            logits = readout(phi_q, inner.head.weight, inner.head.bias)
            nodes = Nodes(phi_q, inner.head.trace.features, inner.head.trace.coeffs)
            path = tuple(inner.encoder_path) + (inner.encoder,)
            return (cross_entropy(logits, yq), nodes), (logits, inner.head.trace, path)

        return self._backward(forward, params, yq, decompose, keep, xs=xs, xq=xq, tasks=1)

    def _shared_step(self, params, batch, decompose: bool, keep=None) -> dict[str, Any]:
        tasks, n_s = batch.support_y.shape
        n_q = batch.query_y.shape[1]

        def encode(e):
            x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
            phi = self.model.encode(e, x, layout=((tasks, n_s), (tasks, n_q)))
            return phi[: tasks * n_s].unflatten(0, (tasks, n_s)), phi[tasks * n_s :].unflatten(0, (tasks, n_q))

        forward = self._head_forward(batch.support_y, batch.query_y, tasks)
        return self._backward(forward, params, batch.query_y, decompose, keep, tasks=tasks, encode=encode)

    def _head_forward(self, ys, yq, tasks):
        """The head-level part of a head-only meta-loss, a function of (features, head params);
        ``tasks`` (shared path) broadcasts the head over a leading task axis."""

        def forward(feats, head_params):
            phi_s, phi_q = feats
            w, b = head_params[HEAD_WEIGHT], head_params[HEAD_BIAS]
            if tasks is not None:
                w, b = w.expand(tasks, *w.shape), b.expand(tasks, *b.shape)
            inner = self.inner_loop(head_params, None, ys, support_features=phi_s, head=init_head(w, b))
            logits = readout(phi_q, inner.head.weight, inner.head.bias)
            nodes = Nodes(phi_q, inner.head.trace.features, inner.head.trace.coeffs)
            return (cross_entropy(logits, yq).mean(), nodes), (logits, inner.head.trace, ())

        return forward

    def _backward(self, forward, params, yq, decompose, keep, xs=None, xq=None, tasks=1, encode=None) -> dict[str, Any]:
        """Plain meta-gradient, ablated gradient (``keep``) and term gradients from one forward.

        With ``encode`` (head-only loops) the VJP runs in two stages: the head-level VJP to the
        features and the head, then one encoder VJP; the ablated step then needs a single
        encoder backward (kept terms), the head's exact gradient coming from the head stage.
        The per-task loop's plain step runs on plain autograd instead (:meth:`_autograd_backward`)."""
        if not decompose and keep is None and self.execution == "loop":
            return self._autograd_backward(forward, params, yq, encode)
        if encode is None:
            (loss, nodes), vjp_fn, (logits, trace, path) = vjp(forward, params, has_aux=True)
        else:
            head_params = {HEAD_WEIGHT: params[HEAD_WEIGHT], HEAD_BIAS: params[HEAD_BIAS]}
            feats, encoder_vjp = vjp(encode, encoder_part(params))
            (loss, nodes), head_vjp, (logits, trace, path) = vjp(forward, feats, head_params, has_aux=True)

            def vjp_fn(cot):
                feat_cot, head_grad = head_vjp(cot)
                (enc_grad,) = encoder_vjp(feat_cot)
                return ({**{ENCODER_PREFIX + k: v for k, v in enc_grad.items()}, **head_grad},)
        phi_q = nodes.query_features
        logits_grad = cross_entropy_logits_grad(logits, yq) / tasks
        zero = torch.zeros_like(loss)
        out: dict[str, Any] = {"loss": loss, "accuracy": accuracy(logits, yq).mean()}
        if keep is not None:
            kept = _sum_nodes(list(term_cotangents(trace, phi_q, logits_grad, keep).values()))
            plain_row = (torch.ones_like(loss), _zeros_like_nodes(nodes))
            head_grad = head_vjp(plain_row)[1] if encode is not None else vjp_fn(plain_row)[0]
            (kept_grad,) = vjp_fn((zero, kept))
            out["grad"] = {k: head_grad[k] if is_head(k) else v for k, v in kept_grad.items()}
        elif not (decompose and self.execution == "loop"):  # map_meta_steps supplies it
            (out["grad"],) = vjp_fn((torch.ones_like(loss), _zeros_like_nodes(nodes)))
        if not decompose:
            return out
        cots = term_cotangents(trace, phi_q, logits_grad, self.terms)
        stacked = stack_nodes([cots[t] for t in self.terms])
        if self.execution == "loop":
            term_grads = stack_trees([vjp_fn((zero, cots[t]))[0] for t in self.terms])
        else:
            (term_grads,) = vmap(lambda c: vjp_fn((zero, c)))(stacked)
        head_w, head_b = readout_head_gradient(phi_q, logits_grad)
        is_init = (torch.arange(len(self.terms), device=loss.device) == self.terms.index("init")).to(loss.dtype)
        term_grads[HEAD_WEIGHT] = term_grads[HEAD_WEIGHT] + is_init[:, None, None] * head_w.reshape(
            -1, *head_w.shape[-2:]).sum(0)
        term_grads[HEAD_BIAS] = term_grads[HEAD_BIAS] + is_init[:, None] * head_b.reshape(-1, head_b.shape[-1]).sum(0)
        out["terms"] = term_grads
        out["pairs"] = pair_weights(trace, logits_grad * tasks)
        out["cosines"] = cosine_matrix(nodes.features[0], phi_q)
        out["reconstruction"] = reconstruction_error(trace, phi_q, logits)
        if self.config.adapt == "all" and self.first_order is False and path:
            out["adaptation"] = self._adaptation(term_grads, stacked, path, xs, xq)
        return out

    def _autograd_backward(self, forward, params, yq, encode) -> dict[str, Any]:
        """The plain meta-gradient of the same forward by ``torch.autograd.grad``, with the
        inner pullbacks on autograd too: no ``torch.func`` transform wraps the loop's ops."""
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad(), autograd_pullbacks():
            if encode is None:
                (loss, _), (logits, _, _) = forward(leaves)
            else:
                head = {HEAD_WEIGHT: leaves[HEAD_WEIGHT], HEAD_BIAS: leaves[HEAD_BIAS]}
                (loss, _), (logits, _, _) = forward(encode(encoder_part(leaves)), head)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return {"grad": dict(zip(leaves, grads)), "loss": loss.detach(), "accuracy": accuracy(logits.detach(), yq).mean()}

    def _adaptation(self, term_grads, stacked: Nodes, path, xs, xq) -> Params:
        """Σ over feature terms of (full − leaf), the leaf gradients taken w.r.t. the adapted
        encoder parameters of each feature evaluation treated as independent leaves."""
        feature_terms = [i for i, t in enumerate(self.terms) if t != "coefficient"]
        idx = torch.tensor(feature_terms, device=stacked.query_features.device)
        leaf: dict[str, Tensor] = {}
        uses = [(path[t], xs, stacked.features[t]) for t in range(len(stacked.features))]
        uses.append((path[-1], xq, stacked.query_features))
        for enc, x, cot in uses:
            enc = {k: v.detach() for k, v in enc.items()}
            _, pull = vjp(lambda e: self.model.encode(e, x), enc)
            (g,) = pull(cot.index_select(0, idx).sum(0))
            for k, v in g.items():
                leaf[k] = leaf.get(k, 0) + v
        full = {k: v.index_select(0, idx).sum(0) for k, v in term_grads.items()}
        return {
            k: v - leaf[k[len(ENCODER_PREFIX):]] if k.startswith(ENCODER_PREFIX) else torch.zeros_like(v)
            for k, v in full.items()
        }

    def _assemble(self, out: dict[str, Any], batch) -> Decomposition:
        terms = {t: {k: v[i] for k, v in out["terms"].items()} for i, t in enumerate(self.terms)}
        return Decomposition(
            terms=terms,
            total=out["grad"],
            pair_weights=out["pairs"],
            feature_cosines=out["cosines"],
            same_class=class_masks(batch.support_y, batch.query_y),
            reconstruction_error=out["reconstruction"],
            identity_error=identity_error(terms, out["grad"]),
            encoder_adaptation=out.get("adaptation"),
        )

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, params: Params, batch: Any, steps: int) -> Tensor:
        if self.config.adapt == "head":
            return self._evaluate_shared(params, batch, steps)
        mode = "loop" if self.execution == "shared" else self.execution
        fn = lambda p, xs, ys, xq, yq: self._evaluate_task(p, xs, ys, xq, yq, steps)  # noqa: E731
        return map_tasks(fn, mode, params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def _evaluate_task(self, params, xs, ys, xq, yq, steps: int) -> Tensor:
        """Step by step from the previous adapted state; with momentum (whose velocity a
        restart would lose) every step count runs from the start."""
        accs, start = [], params
        for t in range(steps + 1):
            if t:
                restart = self.config.inner_momentum != 0
                inner = self.inner_loop(start if restart else params, xs, ys, steps=t if restart else 1,
                                        first_order=True)
                params = {**params, **{ENCODER_PREFIX + k: v.detach() for k, v in inner.encoder.items()},
                          HEAD_WEIGHT: inner.head.weight.detach(), HEAD_BIAS: inner.head.bias.detach()}
            phi_q = self.model.encode(encoder_part(params), xq)
            accs.append(accuracy(readout(phi_q, params[HEAD_WEIGHT], params[HEAD_BIAS]), yq))
        return torch.stack(accs)

    def _evaluate_shared(self, params, batch, steps: int) -> Tensor:
        tasks, n_s = batch.support_y.shape
        n_q = batch.query_y.shape[1]
        with torch.no_grad():
            x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
            phi = self.model.encode(encoder_part(params), x, layout=((tasks, n_s), (tasks, n_q)))
            phi_s = phi[: tasks * n_s].unflatten(0, (tasks, n_s))
            phi_q = phi[tasks * n_s :].unflatten(0, (tasks, n_q))
            head = init_head(
                params[HEAD_WEIGHT].expand(tasks, *params[HEAD_WEIGHT].shape),
                params[HEAD_BIAS].expand(tasks, *params[HEAD_BIAS].shape),
            )
            accs = [accuracy(readout(phi_q, head.weight, head.bias), batch.query_y)]
            start = head
            for t in range(1, steps + 1):
                restart = self.config.inner_momentum != 0
                head = self.inner_loop(params, None, batch.support_y, support_features=phi_s,
                                       head=start if restart else head, steps=t if restart else 1, first_order=True).head
                accs.append(accuracy(readout(phi_q, head.weight, head.bias), batch.query_y))
        return torch.stack(accs, dim=-1)

