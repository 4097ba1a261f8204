"""Hypergradients by backpropagation through an unrolled inner loop (MAML family).

The meta-gradient of one task is the VJP of ``L_Q(adapted(params))`` — second order
through every inner step, or first order with the inner gradients detached. The same
forward also outputs the decomposition nodes ``(φ_q, Φ_τ, A_τ)``, so a decomposition
costs one VJP per term on top of the plain backward (one batched VJP under ``vmap``; one
after the other on the per-task loop). The
meta-gradient a step returns does not depend on whether the decomposition is requested,
bit for bit: the loop's plain step runs on plain autograd, so a decomposition step there
takes its gradient from that plain step (:func:`~bilevel.execution.mapping.map_meta_steps`) and its
terms from a ``torch.func`` pass; the identity check compares them with the gradient the
step returns. The plain, ablated and decomposed rows of the VJP come from the engine's one
:func:`~bilevel.hypergrad.rows.node_rows`; this module only builds the forward.

Execution paths: ``vmap`` and ``loop`` run the per-task function over tasks; ``shared``
(head-only inner loops) runs the encoder once over every support and query image of the
meta-batch, with per-task, per-set BatchNorm statistics through the layout, and batches
the head loops along a task axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from torch.func import vjp

from bilevel.algorithm import AlgorithmConfig
from bilevel.data.batch import TaskBatch
from bilevel.decomposition.cotangents import Nodes
from bilevel.execution.mapping import map_meta_steps
from bilevel.primitives.head import init_head, readout
from bilevel.hypergrad.inner import InnerLoopAlgorithm
from bilevel.hypergrad.recompute import Steps, autograd_vjp, recompute_vjp
from bilevel.hypergrad.rows import Forward, node_rows
from bilevel.decomposition.assembly import assemble, mean_over_tasks
from bilevel.decomposition.step import MetaStep, TaskResult, Want
from bilevel.solvers.pullback import autograd_pullbacks
from bilevel.solvers.sgd import sgd
from bilevel.solvers.steps import InnerStep, descend
from bilevel.solvers.support import InnerConfig, InnerResult, Support
from bilevel.primitives.losses import accuracy, cross_entropy
from bilevel.primitives.precision import loss_scales, unscale
from bilevel.primitives.params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, with_encoder


@dataclass
class UnrolledConfig(AlgorithmConfig):
    """``inner_steps`` T, ``inner_lr`` α, ``inner_momentum`` μ (heavy ball; 0 = plain SGD),
    ``adapt`` in {all, head}, ``order`` in {second_order, first_order}."""

    inner_steps: int = 1
    inner_lr: float = 0.4
    inner_momentum: float = 0.0
    adapt: str = "all"
    order: str = "second_order"

    @property
    def inner(self) -> InnerConfig:
        """The inner loop of these fields, as the bases read it."""
        return InnerConfig(self.inner_steps, self.inner_lr, self.inner_momentum, self.adapt, self.order)


def head_of(params: Params) -> Params:
    """Everything but the encoder: the head, and meta-parameters of the algorithm's own (what a
    head-only inner loop may read)."""
    return {k: v for k, v in params.items() if not k.startswith(ENCODER_PREFIX)}


class UnrolledAlgorithm(InnerLoopAlgorithm):
    """Base for algorithms whose hypergradient is backprop through ``inner_loop``.

    Subclasses may override :meth:`update_rule` (the inner steps chained, :mod:`bilevel.solvers.steps`)
    or the whole :meth:`inner_loop` (any solver built from the head primitives); the decomposition,
    execution paths and evaluation come with the base.
    """

    Config = UnrolledConfig
    terms = ("contrastive", "init", "coefficient")
    splits_contrastive = True

    def __init__(self, model, config, execution: str | None = None) -> None:
        self.executions = ("vmap", "loop", "shared") if config.inner.adapt == "head" else ("vmap", "loop")
        super().__init__(model, config, execution)

    @property
    def default_execution(self) -> str:
        return "loop"

    @property
    def memories(self) -> tuple[str, ...]:
        """``recompute`` restarts each step from its fast parameters and head state, which
        momentum's velocity would have to join: offered for restartable update rules."""
        return ("store", "recompute") if self.restartable else ("store",)

    def memory_note(self) -> str:
        return "" if self.restartable else "memory=recompute needs a restartable inner loop (inner_momentum=0)"

    @property
    def restartable(self) -> bool:
        """Whether the update rule restarts exactly at an adapted point (no momentum, no schedule)."""
        return self.update_rule(self.config.inner).restartable

    @property
    def first_order(self) -> bool:
        return self.config.inner.first_order

    def structural_zeros(self, head_policy: str) -> dict[str, str]:
        """Besides ``init`` under zeroing: ``coefficient`` at first order (``A`` is a constant) and
        after one SGD step from ``W_0 = b_0 = 0`` (the support predictions are uniform whatever the
        encoder, so ``A_0 = −α(P⁰ − Y)/n_s`` does not depend on it); ``contrastive_support`` at
        first order (the support features receive no gradient)."""
        zeros = super().structural_zeros(head_policy)
        if self.first_order:
            zeros["coefficient"] = "first order: what the support samples write into the head is a constant"
            zeros["contrastive_support"] = "first order: the support features receive no gradient"
        elif head_policy == "zeroing" and self.train_steps == 1:
            zeros["coefficient"] = ("one inner step from a zero head: the support predictions are uniform "
                                    "whatever the encoder")
        return zeros

    def update_rule(self, inner: InnerConfig) -> InnerStep:
        """The inner steps chained (:mod:`bilevel.solvers.steps`): SGD with ``inner.lr`` and ``inner.momentum``."""
        return sgd(inner)

    def inner_loop(self, params: Params, support: Support, inner: InnerConfig) -> InnerResult:
        """The inner solver: ``inner.steps`` steps of :meth:`update_rule` (:func:`~bilevel.solvers.steps.descend`)."""
        return descend(self.model, params, support, inner, self.update_rule(inner))

    # ----------------------------------------------------------------------------- meta-gradient
    def meta_step(self, params: Params, batch: TaskBatch, want: Want = Want()) -> MetaStep:
        if self.execution == "shared":
            return assemble(self._shared_task(params, batch, want), batch, want)
        per_task = map_meta_steps(
            lambda w: partial(self._task, want=w), self.execution, params,
            batch.support_x, batch.support_y, batch.query_x, batch.query_y, want=want,
        )
        return assemble(mean_over_tasks(per_task), batch, want)

    def _task(self, params: Params, xs, ys, xq, yq, want: Want) -> TaskResult:
        """One task's rows: a full-network or a head-only forward."""
        if self.config.inner.adapt == "head":
            encode = lambda e: (self.model.encode(e, xs), self.model.encode(e, xq))  # noqa: E731
            return self._head_task(params, encode, self._head_forward(ys, yq, None), yq, want, tasks=1)
        if self.segment is not None:
            return self._recompute_task(params, xs, ys, xq, yq, want)

        def forward(p: Params):
            inner = self.inner_loop(p, Support(ys, images=xs), self.config.inner)
            phi_q = self.model.encode(inner.encoder, xq)
            logits = readout(phi_q, inner.head.weight, inner.head.bias)
            path = tuple(inner.encoder_path) + (inner.encoder,)
            return (cross_entropy(logits, yq), Nodes.of(inner.head.trace, phi_q)), (logits, inner.head.trace, path)

        if self._on_autograd(want):
            return self._autograd_task(forward, params, yq)
        (loss, nodes), pullback, (logits, trace, path) = vjp(forward, params, has_aux=True)
        adaptation = None
        if not self.first_order and want.terms:
            adaptation = partial(self._adaptation, terms=want.terms, path=path, xs=xs, xq=xq)
        forward_ = Forward(loss, logits, yq, nodes, trace, lambda c: pullback(c)[0])
        return node_rows(forward_, want, plain=self._plain_row(want), sequential=self.execution == "loop",
                         adaptation=adaptation)

    def _steps(self, xs, ys, xq, yq) -> Steps:
        """The full-network inner loop split at its steps: the carry is ``(θ_t, head state)``; a
        step is :meth:`inner_loop` restarted there for one step (momentum-free loops only)."""

        def init(p: Params):
            return encoder_part(p), init_head(p[HEAD_WEIGHT], p[HEAD_BIAS])

        def step(carry, p: Params, first_order: bool | None = None):
            one = self.config.inner.with_steps(1, first_order)
            inner = self.inner_loop(with_encoder(p, carry[0]), Support(ys, images=xs, head=carry[1]), one)
            return inner.encoder, inner.head

        def final(carry, p: Params):
            phi_q = self.model.encode(carry[0], xq)
            logits = readout(phi_q, carry[1].weight, carry[1].bias)
            return (cross_entropy(logits, yq), Nodes.of(carry[1].trace, phi_q)), (logits, carry[1].trace)

        return Steps(init, step, partial(step, first_order=True), final, self.config.inner.steps)

    def _recompute_task(self, params: Params, xs, ys, xq, yq, want: Want) -> TaskResult:
        """:meth:`_task` under ``memory=recompute[:K]`` (:mod:`bilevel.hypergrad.recompute`): the
        same rows from a pullback that re-runs the inner steps segment by segment."""
        steps = self._steps(xs, ys, xq, yq)
        if self._on_autograd(want):
            with autograd_pullbacks():
                (loss, nodes), pullback, (logits, _), _ = recompute_vjp(steps, params, self.segment, autograd_vjp)
                (grad,) = pullback((torch.ones_like(loss), nodes.zeros()))
            return TaskResult(loss.detach(), accuracy(logits, yq).mean(), grad=grad)
        diagnose = bool(want.terms) and not self.first_order
        (loss, nodes), pullback, (logits, trace), carries = recompute_vjp(steps, params, self.segment,
                                                                           keep_every=diagnose)
        adaptation = None
        if diagnose:
            path = tuple(carry[0] for carry in carries)
            adaptation = partial(self._adaptation, terms=want.terms, path=path, xs=xs, xq=xq)
        forward_ = Forward(loss, logits, yq, nodes, trace, lambda c: pullback(c)[0])
        return node_rows(forward_, want, plain=self._plain_row(want), sequential=self.execution == "loop",
                         adaptation=adaptation)

    def _shared_task(self, params: Params, batch: TaskBatch, want: Want) -> TaskResult:
        """The whole meta-batch at once (head-only loops): one encoder pass over every support
        and query image, per-task and per-set BatchNorm statistics through the layout."""
        tasks, n_s = batch.support_y.shape
        n_q = batch.query_y.shape[1]

        def encode(e):
            x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
            phi = self.model.encode(e, x, layout=((tasks, n_s), (tasks, n_q)))
            return phi[: tasks * n_s].unflatten(0, (tasks, n_s)), phi[tasks * n_s :].unflatten(0, (tasks, n_q))

        forward = self._head_forward(batch.support_y, batch.query_y, tasks)
        return self._head_task(params, encode, forward, batch.query_y, want, tasks)

    def _head_forward(self, ys, yq, tasks):
        """The head-level part of a head-only meta-loss, a function of (features, head params);
        ``tasks`` (shared path) broadcasts the head over a leading task axis."""

        def forward(feats, head_params):
            phi_s, phi_q = feats
            w, b = head_params[HEAD_WEIGHT], head_params[HEAD_BIAS]
            if tasks is not None:
                w, b = w.expand(tasks, *w.shape), b.expand(tasks, *b.shape)
            inner = self.inner_loop(head_params, Support(ys, features=phi_s, head=init_head(w, b)), self.config.inner)
            logits = readout(phi_q, inner.head.weight, inner.head.bias)
            return (cross_entropy(logits, yq).mean(), Nodes.of(inner.head.trace, phi_q)), (logits, inner.head.trace)

        return forward

    def _head_task(self, params: Params, encode: Callable, forward: Callable, yq: Tensor, want: Want,
                   tasks: int) -> TaskResult:
        """A head-only forward's rows by a two-stage VJP: the head-level VJP to the features and
        the head, then one encoder VJP (the ablated step's head gradient needs only the first)."""
        if self._on_autograd(want):
            return self._autograd_task(lambda p: forward(encode(encoder_part(p)), head_of(p)), params, yq)
        feats, encoder_vjp = vjp(encode, encoder_part(params))
        (loss, nodes), head_vjp, (logits, trace) = vjp(forward, feats, head_of(params), has_aux=True)

        def pullback(cotangent) -> Params:
            feat_cot, head_grad = head_vjp(cotangent)
            (enc_grad,) = encoder_vjp(feat_cot)
            return {**{ENCODER_PREFIX + k: v for k, v in enc_grad.items()}, **head_grad}

        return node_rows(Forward(loss, logits, yq, nodes, trace, pullback, tasks), want, plain=self._plain_row(want),
                         head_pullback=lambda c: head_vjp(c)[1], sequential=self.execution == "loop")

    def _on_autograd(self, want: Want) -> bool:
        """The loop's plain step runs on plain autograd (no ``torch.func`` transform)."""
        return want == Want() and self.execution == "loop"

    def _plain_row(self, want: Want) -> bool:
        """Whether the VJP computes the plain row (a decomposing loop step takes it from a plain step)."""
        return not (want.terms and self.execution == "loop")

    def _autograd_task(self, forward: Callable, params: Params, yq: Tensor) -> TaskResult:
        """The plain meta-gradient of ``forward`` (``((loss, nodes), (logits, ...))``) by
        ``torch.autograd.grad``, with the inner
        pullbacks on autograd too: no ``torch.func`` transform wraps the loop's ops (an fp16 loss
        scale: :func:`~bilevel.primitives.precision.loss_scales`)."""
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        _, scale = loss_scales()
        with torch.enable_grad(), autograd_pullbacks():
            (loss, _), aux = forward(leaves)
            grads = torch.autograd.grad(loss if scale == 1.0 else loss * scale, list(leaves.values()),
                                        materialize_grads=True)
        grad = unscale(dict(zip(leaves, grads)), scale)
        return TaskResult(loss.detach(), accuracy(aux[0].detach(), yq).mean(), grad=grad)

    def _adaptation(self, term_grads: Params, stacked: Nodes, terms: tuple[str, ...], path, xs, xq) -> Params:
        """Σ over feature terms of (full − leaf), the leaf gradients taken w.r.t. the adapted
        encoder parameters of each feature evaluation treated as independent leaves."""
        feature_terms = [i for i, t in enumerate(terms) if t != "coefficient"]
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

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> Tensor:
        """Task by task (:meth:`InnerLoopAlgorithm.evaluate`), or, head-only, every task at once on
        the shared encoder pass."""
        if self.config.inner.adapt == "head":
            return self._evaluate_shared(params, batch, steps)
        return super().evaluate(params, batch, steps)

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
            start, restart = head, not self.restartable
            for t in range(1, steps + 1):
                support = Support(batch.support_y, features=phi_s, head=start if restart else head)
                head = self.inner_loop(params, support, self.config.inner.with_steps(t if restart else 1, True)).head
                accs.append(accuracy(readout(phi_q, head.weight, head.bias), batch.query_y))
        return torch.stack(accs, dim=-1)
