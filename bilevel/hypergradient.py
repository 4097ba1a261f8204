"""One task's hypergradient as a typed value, and the one assembly of a meta-step from them.

Every hypergradient rule (unrolled, implicit, chain) maps a task — or, on the ``shared`` path,
the whole meta-batch at once — to a :class:`TaskResult`. What it computes is a :class:`Want`:

- the plain meta-gradient (``Want()``);
- the ablated meta-gradient for a ``keep`` set: the exact gradient on the head, the sum of the
  kept terms on everything else (``Want(keep=...)``);
- the decomposition into ``terms`` (``Want(terms=...)``), with the plain gradient as its total.

Rules that reach the meta-parameters by a VJP of the *nodes* ``(φ_q, Φ_τ, A_τ, W_0, b_0)``
(:class:`~bilevel.decompose.Nodes`) share :func:`node_rows`: by linearity of the VJP, a term's
gradient is the pullback of its node cotangents, the ablated gradient is the pullback of the kept
cotangents' sum, and the plain gradient is the pullback of ``∂L/∂L = 1``. A rule may add
*direct* rows, parts of a term that do not flow through the nodes (iMAML's ``solve_error``).

:func:`mean_over_tasks` reduces a stacked result and :func:`assemble` turns it into the
:class:`~bilevel.algorithm.MetaStep`, the :class:`~bilevel.decompose.Decomposition` included;
no algorithm assembles one itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import vmap

from .data.batch import TaskBatch
from .decompose import (
    Decomposition,
    Nodes,
    class_masks,
    cosine_matrix,
    identity_error,
    pair_weights,
    reconstruction_error,
    stack_nodes,
    sum_nodes,
    term_cotangents,
)
from .execution import stack_trees
from .head import HeadTrace
from .losses import accuracy, cross_entropy_logits_grad
from .params import ENCODER_PREFIX, Params

NodePullback = Callable[[tuple[Tensor, Nodes]], Params]
"""``(∂ℓ/∂loss, ∂ℓ/∂nodes) ↦ ∂ℓ/∂(meta-parameters)``: the VJP of one forward."""


@dataclass
class MetaStep:
    """One meta-batch: the meta-gradient (mean over tasks), the mean query loss and accuracy
    after adaptation, the decomposition when requested, and algorithm-specific scalars."""

    grad: Params
    loss: Tensor
    accuracy: Tensor
    decomposition: Optional[Decomposition] = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class Want(NamedTuple):
    """What a meta-step computes: the decomposition into ``terms`` (empty: none) and the
    ablated gradient that keeps ``keep`` (None: the plain meta-gradient is followed)."""

    terms: tuple[str, ...] = ()
    keep: Optional[tuple[str, ...]] = None


class TaskResult(NamedTuple):
    """One task's (or one shared batch's) hypergradient and what was asked of it.

    ``grad`` is the plain meta-gradient (None when a decomposing ``loop`` step takes it from a
    plain step, :func:`~bilevel.execution.map_meta_steps`); ``ablated`` the gradient of
    ``Want.keep`` when no decomposition was asked; ``terms`` the term gradients stacked
    ``{key: [len(Want.terms), *shape]}``; ``pairs`` ``[entries, n_s, n_q]`` and ``cosines``
    ``[n_s, n_q]`` per task; ``reconstruction`` the eq. (1) error; ``adaptation`` the
    encoder-adaptation diagnostic; ``extras`` per-task scalars (averaged over tasks)."""

    loss: Tensor
    accuracy: Tensor
    grad: Optional[Params] = None
    ablated: Optional[Params] = None
    terms: Optional[Params] = None
    pairs: Optional[Tensor] = None
    cosines: Optional[Tensor] = None
    reconstruction: Optional[Tensor] = None
    adaptation: Optional[Params] = None
    extras: dict[str, Tensor] = {}


class Forward(NamedTuple):
    """One forward of a node-pullback rule: the query loss and logits, the nodes and head trace it
    read, and its VJP. ``tasks`` > 1: a shared batch whose loss is the mean over its tasks."""

    loss: Tensor
    logits: Tensor
    query_y: Tensor
    nodes: Nodes
    trace: HeadTrace
    pullback: NodePullback
    tasks: int = 1

    def logits_grad(self) -> Tensor:
        """``g_q = ∂L/∂z_q`` of the forward's loss."""
        return cross_entropy_logits_grad(self.logits, self.query_y) / self.tasks

    def cotangents(self, terms: tuple[str, ...]) -> dict[str, Nodes]:
        """The node cotangents of ``terms`` (:func:`~bilevel.decompose.term_cotangents`)."""
        return term_cotangents(self.trace, self.nodes.query_features, self.logits_grad(), terms)

    def pull(self, cotangent: Nodes) -> Params:
        """The meta-gradient of a node cotangent (the loss itself held constant)."""
        return self.pullback((torch.zeros_like(self.loss), cotangent))


def plain_row(forward: Forward, pullback: Optional[NodePullback] = None) -> Params:
    """The plain meta-gradient: the VJP of ``∂L/∂L = 1`` (by ``pullback``, default the forward's)."""
    return (pullback or forward.pullback)((torch.ones_like(forward.loss), forward.nodes.zeros()))


def ablated_row(forward: Forward, keep: tuple[str, ...], head_grad: Params, direct: dict[str, Params]) -> Params:
    """The kept terms' sum on the encoder — one VJP of the kept cotangents' sum (linearity), plus
    the kept terms' direct rows — and the exact ``head_grad`` on everything else (the head, and
    meta-parameters of the algorithm's own)."""
    kept = forward.pull(sum_nodes(list(forward.cotangents(keep).values())))
    for term in keep:
        kept = {k: v + direct[term][k] for k, v in kept.items()} if term in direct else kept
    return {k: v if k.startswith(ENCODER_PREFIX) else head_grad[k] for k, v in kept.items()}


def term_rows(forward: Forward, terms: tuple[str, ...], direct: dict[str, Params],
              sequential: bool) -> tuple[Params, Nodes]:
    """Every term's gradient, stacked ``{key: [len(terms), *shape]}`` (one ``vmap`` of the VJP, or
    one VJP after the other when ``sequential``), and the stacked node cotangents."""
    cots = forward.cotangents(terms)
    rows = [cots[t] for t in terms]
    stacked = stack_nodes(rows)
    if sequential:
        grads = stack_trees([forward.pull(c) for c in rows])
    else:
        grads = vmap(forward.pull)(stacked)
    if any(t in direct for t in terms):
        grads = {k: v + torch.stack([direct[t][k] if t in direct else torch.zeros_like(v[0]) for t in terms])
                 for k, v in grads.items()}
    return grads, stacked


def node_rows(
    forward: Forward,
    want: Want,
    *,
    grad: Optional[Params] = None,
    plain: bool = True,
    head_pullback: Optional[NodePullback] = None,
    direct: Optional[dict[str, Params]] = None,
    sequential: bool = False,
    adaptation: Optional[Callable[[Params, Nodes], Params]] = None,
) -> TaskResult:
    """The :class:`TaskResult` ``want`` asks for, from one forward (module docstring).

    ``grad`` is the plain meta-gradient when the rule has it already; ``plain=False`` skips the
    plain row (a decomposing ``loop`` step takes it from a plain step); ``head_pullback`` is a
    cheaper VJP exact on the head keys (the ablated step's head gradient); ``direct[term]`` is
    added to that term's row; ``sequential``: see :func:`term_rows`;
    ``adaptation(term_grads, stacked_cotangents)`` computes the encoder-adaptation diagnostic.
    """
    direct = direct or {}
    out = TaskResult(forward.loss, accuracy(forward.logits, forward.query_y).mean())
    if want.keep is not None and not want.terms:
        head = grad if grad is not None else plain_row(forward, head_pullback)
        return out._replace(ablated=ablated_row(forward, want.keep, head, direct))
    if grad is None and plain:
        grad = plain_row(forward)
    if not want.terms:
        return out._replace(grad=grad)
    terms, stacked = term_rows(forward, want.terms, direct, sequential)
    trace, phi_q = forward.trace, forward.nodes.query_features
    return out._replace(
        grad=grad,
        terms=terms,
        pairs=pair_weights(trace, forward.logits_grad() * forward.tasks),
        cosines=cosine_matrix(forward.nodes.features[0], phi_q),
        reconstruction=reconstruction_error(trace, phi_q, forward.logits),
        adaptation=adaptation(terms, stacked) if adaptation is not None else None,
    )


def mean_over_tasks(result: TaskResult) -> TaskResult:
    """Reduce a result stacked over tasks (leading axis): means of the losses, gradients, terms,
    adaptation and extras, the largest reconstruction error; pairs and cosines keep their task axis."""

    def mean(tree: Optional[Params]) -> Optional[Params]:
        return None if tree is None else {k: v.mean(0) for k, v in tree.items()}

    return result._replace(
        loss=result.loss.mean(0),
        accuracy=result.accuracy.mean(0),
        grad=mean(result.grad),
        ablated=mean(result.ablated),
        terms=mean(result.terms),
        reconstruction=None if result.reconstruction is None else result.reconstruction.amax(),
        adaptation=mean(result.adaptation),
        extras=mean(result.extras),
    )


def assemble(result: TaskResult, batch: TaskBatch, want: Want, extras: Optional[dict[str, Tensor]] = None) -> MetaStep:
    """The :class:`~bilevel.algorithm.MetaStep` of a reduced result: the gradient the outer
    optimiser follows (plain, or ablated: the kept terms' sum on all but the head), and the
    :class:`~bilevel.decompose.Decomposition` whose identity check compares the sum of the
    terms with the plain gradient."""
    grad = result.ablated if result.ablated is not None else result.grad
    decomposition = None
    if want.terms:
        terms = {t: {k: v[i] for k, v in result.terms.items()} for i, t in enumerate(want.terms)}
        decomposition = Decomposition(
            terms=terms,
            total=result.grad,
            pair_weights=result.pairs,
            feature_cosines=result.cosines,
            same_class=class_masks(batch.support_y, batch.query_y),
            reconstruction_error=result.reconstruction,
            identity_error=identity_error(terms, result.grad),
            encoder_adaptation=result.adaptation,
        )
        if want.keep is not None:
            grad = decomposition.combine(want.keep)
    return MetaStep(grad, result.loss, result.accuracy, decomposition, {**result.extras, **(extras or {})})
