"""Memory strategies of an unrolled inner loop: store every step's graph, or recompute it.

An inner loop of ``T`` steps is ``c_0 = init(p)``, ``c_{t+1} = step(c_t, p)``, ``out = final(c_T, p)``,
with the *carry* ``c_t`` what a step needs to restart (the fast parameters and the head state with
its trace; the trace is a few ``n × d`` and ``n × N`` blocks per step). ``memory=store`` takes
one VJP of the whole composition, which holds the activations of all ``T`` steps until the
outer backward. ``memory=recompute:K`` runs the steps forward keeping only the carry every ``K``
steps (values, no graph), holds the VJP of ``final`` (the query pass), and pulls a cotangent back
segment by segment: re-run ``K`` steps forward from their checkpoint under a VJP, pull the
carry's cotangent through them, free them, go to the previous segment. The cotangent of ``p`` is
the sum of every segment's, the query pass's and ``init``'s: by the chain rule the same
vector-Jacobian product as the stored one, only the order of the floating-point sums differs.
The pullback is linear in its cotangent like any VJP, so the plain, ablated and decomposed rows
(:mod:`bilevel.hypergrad.rows`) come out of it unchanged. Peak activation memory: the query
pass plus ``K`` steps, instead of the query pass plus ``T`` steps; time: one more forward of
each step.

Two differentiation routes share the sweep: ``torch.func.vjp`` (inside ``vmap`` and for the
decomposition) and plain autograd (:func:`autograd_vjp`: the per-task loop's plain step).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.func import vjp
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

MEMORY_KINDS = ("store", "recompute")
MEMORY_CHOICES = ("auto",) + MEMORY_KINDS
"""``memory`` values: ``store``, ``recompute``, ``recompute:K`` (K >= 1 steps per segment), or
``auto`` (the run picks the fastest that fits: :mod:`bilevel.execution.memory`)."""

Vjp = Callable[..., tuple[Any, Callable[[Any], tuple[Any, ...]]]]


class Steps(NamedTuple):
    """An inner loop split at its steps (module docstring). ``advance`` is ``step`` for values
    only (e.g. first order: the same numbers without a differentiable inner gradient)."""

    init: Callable[[Any], Any]
    step: Callable[[Any, Any], Any]
    advance: Callable[[Any, Any], Any]
    final: Callable[[Any, Any], tuple[Any, Any]]
    count: int


def _detached(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def autograd_vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
    """``torch.func.vjp``'s contract on plain autograd: ``fn`` runs on detached leaves that
    require grad; the pullback is ``torch.autograd.grad`` (zeros for inputs the output does not
    reach; outputs that do not require grad are skipped)."""
    leaves = tree_map(lambda t: t.detach().requires_grad_(t.is_floating_point()), primals)
    with torch.enable_grad():
        out = fn(*leaves)
    flat_in, in_spec = tree_flatten(leaves)

    def pullback(cotangent: Any) -> tuple[Any, ...]:
        pairs = [(o, c) for o, c in zip(tree_flatten(out)[0], tree_flatten(cotangent)[0]) if o.requires_grad]
        wanted = [x for x in flat_in if x.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs],
                                         allow_unused=True, materialize_grads=True) if pairs else ())
        return tuple(tree_unflatten([next(grads, None) if x.requires_grad else torch.zeros_like(x)
                                     for x in flat_in], in_spec))

    return out, pullback


def _add(a: Any, b: Any) -> Any:
    return tree_map(lambda x, y: x + y, a, b)


def _run(steps: Steps, carry: Any, consts: Any, count: int) -> Any:
    for _ in range(count):
        carry = steps.step(carry, consts)
    return carry


def recompute_vjp(steps: Steps, consts: Any, segment: int, route: Vjp = vjp,
                  keep_every: bool = False) -> tuple[Any, Callable[[Any], tuple[Any]], Any, list[Any]]:
    """``(out, pullback, aux, carries)`` of ``final(c_T, consts)`` as a function of ``consts``,
    recomputing ``segment`` steps at a time (module docstring). ``carries``: the checkpointed
    carries, every one of ``c_0 … c_T`` when ``keep_every``. ``route``: ``torch.func.vjp`` or
    :func:`autograd_vjp`."""
    fixed = _detached(consts)
    carry = _detached(steps.init(fixed))
    every = 1 if keep_every else segment
    carries = [carry]
    for t in range(steps.count):
        carry = _detached(steps.advance(carry, fixed) if route is vjp else
                          route(steps.advance, carry, fixed)[0])
        if (t + 1) % every == 0 or t + 1 == steps.count:
            carries.append(carry)
    starts = list(range(0, steps.count, segment))
    checkpoints = [carries[s // every] for s in starts]
    (out, aux), final_pull = _vjp_with_aux(route, steps.final, carry, fixed)

    def pullback(cotangent: Any) -> tuple[Any]:
        carry_cot, total = final_pull(cotangent)
        for start, checkpoint in zip(reversed(starts), reversed(checkpoints)):
            count = min(segment, steps.count - start)
            _, pull = route(lambda c, k: _run(steps, c, k, count), checkpoint, fixed)
            carry_cot, consts_cot = pull(carry_cot)
            total = _add(total, consts_cot)
        (init_cot,) = route(steps.init, fixed)[1](carry_cot)
        return (_add(total, init_cot),)

    return out, pullback, aux, carries


def _vjp_with_aux(route: Vjp, fn: Callable[..., tuple[Any, Any]], *primals: Any):
    """``((out, aux), pullback)`` of ``fn`` returning ``(out, aux)``, aux not differentiated."""
    if route is vjp:
        out, pull, aux = vjp(fn, *primals, has_aux=True)
        return (out, aux), pull
    held: list[Any] = []

    def main(*args: Any) -> Any:
        out, aux = fn(*args)
        held.append(aux)
        return out

    out, pull = route(main, *primals)
    return (out, _detached(held[0])), pull
