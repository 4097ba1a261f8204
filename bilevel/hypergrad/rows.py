"""Node-pullback hypergradient rows: the plain, ablated and decomposed meta-gradient of one forward.

Rules that reach the meta-parameters by a VJP of the *nodes* ``(φ_q, Φ_τ, A_τ, W_0, b_0)``
(:class:`~bilevel.decomposition.cotangents.Nodes`) — the unrolled and the implicit rule — share
:func:`node_rows`: by linearity of the VJP, a term's gradient is the pullback of its node
cotangents (:func:`term_rows`), the ablated gradient is the pullback of the kept cotangents' sum
(:func:`ablated_row`), and the plain gradient is the pullback of ``∂L/∂L = 1``
(:func:`plain_row`). A rule may add *direct* rows, parts of a term that do not flow through the
nodes (iMAML's ``solve_error``). The result is a
:class:`~bilevel.decomposition.step.TaskResult` for what a
:class:`~bilevel.decomposition.step.Want` asks.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import vmap

from bilevel.decomposition.step import TaskResult, Want
from bilevel.decomposition.cotangents import (
    Nodes,
    cosine_matrix,
    pair_weights,
    stack_nodes,
    sum_nodes,
    term_cotangents,
)
from bilevel.decomposition.checks import reconstruction_error
from bilevel.primitives.head import HeadTrace
from bilevel.primitives.losses import accuracy, cross_entropy_logits_grad
from bilevel.primitives.params import ENCODER_PREFIX, Params, stack_trees

NodePullback = Callable[[tuple[Tensor, Nodes]], Params]
"""``(∂ℓ/∂loss, ∂ℓ/∂nodes) ↦ ∂ℓ/∂(meta-parameters)``: the VJP of one forward."""


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
        """The node cotangents of ``terms`` (:func:`~bilevel.decomposition.cotangents.term_cotangents`)."""
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

