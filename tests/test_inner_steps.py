"""A new inner optimiser is one step: the per-step learning-rate schedule of docs/plugins.md §11.

The docs' code block is run as it stands (so the page and the test cannot drift apart) and its
``DecayedMAML`` is checked in float64 against a literal MAML with the same per-step rates, written
with ``functional_call``, ``F.cross_entropy`` and ``torch.autograd.grad`` (heavy ball ``v ← μ v + g``,
``x ← x − α_t v`` with momentum), which is itself checked against a central finite difference.
The steps' contract (one step size per chain) is checked too.
"""
from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel.algorithm as engine
from bilevel import ConfigError, Support, build_algorithm, chain_steps, descend, momentum, rate, register, sgd
from bilevel.primitives.params import is_head

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
LR, DECAY, MU, STEPS = 0.4, 0.5, 0.6, 3


def documented_block() -> str:
    """The docs' code block that defines ``lr_schedule``."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "def lr_schedule" in b]
    return block


def documented_plugin() -> dict:
    """The namespace of :func:`documented_block`, executed as a module of its own."""
    module = types.ModuleType("decayed_maml_doc")
    sys.modules[module.__name__] = module
    exec(compile(documented_block(), str(DOC), "exec", dont_inherit=True), module.__dict__)
    return module.__dict__


@pytest.fixture
def decayed(monkeypatch):
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("decayed_maml")(documented_plugin()["DecayedMAML"])


def literal_adapt(model, params, x, y, rates, *, adapt, mu, first_order):
    """One step of size ``rates[t]`` per entry (heavy ball with ``mu``) over the adapted keys."""
    keys = [k for k in params if adapt == "all" or is_head(k)]
    fast, velocity = dict(params), {k: torch.zeros_like(params[k]) for k in keys}
    for rate_t in rates:
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
        velocity = {k: mu * velocity[k] + g for k, g in zip(keys, grads)}
        fast.update({k: fast[k] - rate_t * velocity[k] for k in keys})
    return fast


def schedule(lr: float, decay: float, steps: int) -> list[float]:
    return [lr * decay ** t for t in range(steps)]


def literal_meta_loss(p, params, **kw):
    b = p.batch
    rates = schedule(LR, DECAY, STEPS)
    losses = [F.cross_entropy(functional_call(p.model, literal_adapt(p.model, params, b.support_x[i], b.support_y[i],
                                                                     rates, **kw), (b.query_x[i],)), b.query_y[i])
              for i in range(b.support_y.shape[0])]
    return torch.stack(losses).mean()


def literal_meta_grad(p, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.params.items()}
    return dict(zip(leaves, torch.autograd.grad(literal_meta_loss(p, leaves, **kw), list(leaves.values()))))


def test_the_documented_step_is_short_and_uses_bilevel_alone():
    block = documented_block()
    assert len(block.splitlines()) <= 30
    imported = {node.module for node in ast.walk(ast.parse(block)) if isinstance(node, ast.ImportFrom)}
    assert imported == {"bilevel", "dataclasses", "typing"}
    assert documented_plugin()["lr_schedule"]([0.1]).restartable is False


@pytest.mark.usefixtures("single_thread", "decayed")
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("mu", [0.0, MU])
def test_a_schedule_matches_the_literal_maml_and_decomposes_exactly(make_problem, rel_err, adapt, order, mu):
    p = make_problem("mlp", shots=2, head="random")
    config = {"name": "decayed_maml", "inner_steps": STEPS, "inner_lr": LR, "decay": DECAY, "adapt": adapt,
              "order": order, "inner_momentum": mu}
    expected = literal_meta_grad(p, adapt=adapt, mu=mu, first_order=order == "first_order")
    algo = build_algorithm(config, p.model)
    assert algo.memories == ("store",)
    for execution in algo.executions:
        step = algo.with_execution(execution).meta_grad(p.params, p.batch, decompose=True)
        assert rel_err(step.grad, expected) < 1e-10, execution
        d = step.decomposition
        assert float(d.identity_error) < 1e-10 and float(d.reconstruction_error) < 1e-10, execution
        assert rel_err({k: sum(t[k] for t in d.terms.values()) for k in expected}, expected) < 1e-10, execution


@pytest.mark.usefixtures("single_thread")
def test_the_literal_reference_matches_finite_differences(make_problem):
    p = make_problem("mlp", shots=2, head="random")
    grad = literal_meta_grad(p, adapt="all", mu=MU, first_order=False)
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=v.dtype)
                 for k, v in p.params.items()}
    h = 1e-6
    shifted = [literal_meta_loss(p, {k: (v + s * h * direction[k]).requires_grad_() for k, v in p.params.items()},
                                 adapt="all", mu=MU, first_order=False) for s in (1, -1)]
    fd = float((shifted[0] - shifted[1]).detach() / (2 * h))
    analytic = float(sum((grad[k] * direction[k]).sum() for k in grad))
    assert abs(fd - analytic) < 1e-7 * max(1.0, abs(fd))


@pytest.mark.usefixtures("single_thread", "decayed")
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_evaluation_runs_every_step_count_with_the_schedule_from_the_start(make_problem, adapt):
    """Large, fast-decaying steps and 60 queries per task: continuing from the adapted state with the
    schedule restarted at ``α_0`` would change these accuracies."""
    p = make_problem("mlp", shots=5, queries=20, tasks=3, head="random")
    lr, decay = 2.0, 0.1
    algo = build_algorithm({"name": "decayed_maml", "inner_steps": 1, "inner_lr": lr, "decay": decay,
                            "adapt": adapt}, p.model)
    accs = algo.evaluate(p.params, p.batch, STEPS)
    b, leaves = p.batch, {k: v.detach().clone().requires_grad_() for k, v in p.params.items()}
    for t in range(STEPS + 1):
        for i in range(b.support_y.shape[0]):
            fast = literal_adapt(p.model, leaves, b.support_x[i], b.support_y[i], schedule(lr, decay, t),
                                 adapt=adapt, mu=0.0, first_order=True)
            logits = functional_call(p.model, fast, (b.query_x[i],))
            assert float(accs[i, t]) == pytest.approx(float((logits.argmax(-1) == b.query_y[i]).double().mean()))


@pytest.mark.usefixtures("decayed")
def test_recompute_is_refused_for_a_stateful_step(make_problem):
    p = make_problem("mlp")
    algo = build_algorithm({"name": "decayed_maml", "inner_steps": 2}, p.model)
    with pytest.raises(ConfigError, match="restartable"):
        algo.with_memory("recompute")


def test_a_chain_sets_its_step_size_exactly_once(make_problem):
    p = make_problem("mlp")
    support = Support(p.batch.support_y[0], images=p.batch.support_x[0])
    inner = build_algorithm({"name": "maml", "inner_steps": 1}, p.model).config.inner
    with pytest.raises(ValueError, match="twice"):
        descend(p.model, p.params, support, inner, chain_steps(rate(0.1), rate(0.2)))
    with pytest.raises(ValueError, match="no step size"):
        descend(p.model, p.params, support, inner, momentum(0.5))
    with pytest.raises(ValueError, match="no step size"):
        descend(p.model, p.params, support, inner, rate(None))
    assert sgd(inner).restartable and not sgd(inner, prox=0.5).restartable
