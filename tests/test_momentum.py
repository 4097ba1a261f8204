"""Momentum and proximal inner loops keep eq. (1) exact and their decomposition complete."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel.primitives.head import reconstruct_logits
from bilevel import InnerConfig, Support, sgd_steps

MU, LAM = 0.7, 0.5


def momentum_meta_grad(model, params, batch, *, steps, lr, adapt, first_order):
    """Independent heavy-ball MAML: v ← μ v + ∇L_S, θ ← θ − α v, by torch.autograd."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    keys = [k for k in leaves if adapt == "all" or k.startswith("head.")]
    losses = []
    for i in range(batch.support_y.shape[0]):
        fast, velocity = dict(leaves), {k: torch.zeros_like(leaves[k]) for k in keys}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
            velocity = {k: MU * velocity[k] + g for k, g in zip(keys, grads)}
            fast.update({k: fast[k] - lr * velocity[k] for k in keys})
        losses.append(F.cross_entropy(functional_call(model, fast, (batch.query_x[i],)), batch.query_y[i]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_momentum_maml_matches_autograd_and_decomposes_exactly(make_problem, rel_err, adapt, order):
    problem = make_problem("mlp", head="random")
    algo = problem.algorithm(adapt=adapt, order=order, inner_steps=3, inner_momentum=MU)
    expected = momentum_meta_grad(problem.model, problem.params, problem.batch, steps=3,
                                  lr=problem.inner_lr, adapt=adapt, first_order=order == "first_order")
    for execution in algo.executions:
        algo = algo.with_execution(execution)
        step = algo.meta_grad(problem.params, problem.batch, decompose=True)
        assert rel_err(step.grad, expected) < 1e-10
        d = step.decomposition
        assert float(d.reconstruction_error) < 1e-10
        summed = {k: sum(t[k] for t in d.terms.values()) for k in expected}
        assert rel_err(summed, expected) < 1e-10


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_proximal_momentum_trace_reconstructs_the_head(make_problem, adapt):
    problem = make_problem("mlp", head="random")
    xs, ys = problem.batch.support_x[0], problem.batch.support_y[0]
    result = sgd_steps(problem.model, problem.params, Support(ys, images=xs),
                       InnerConfig(steps=4, lr=0.3, momentum=MU, adapt=adapt), prox=LAM)
    phi = problem.model.encode(result.encoder, problem.batch.query_x[0])
    logits = phi @ result.head.weight.T + result.head.bias
    assert float((reconstruct_logits(result.head.trace, phi) - logits).abs().max()) < 1e-12


def test_proximal_momentum_head_matches_a_direct_implementation(make_problem):
    """Head-only: W ← W − α v, v ← μ v + ∇_W L_S + λ (W − W_0), written out with autograd."""
    problem = make_problem("mlp", head="random")
    xs, ys = problem.batch.support_x[0], problem.batch.support_y[0]
    result = sgd_steps(problem.model, problem.params, Support(ys, images=xs),
                       InnerConfig(steps=4, lr=0.3, momentum=MU, adapt="head", order="first_order"), prox=LAM)
    feats = problem.model.encode({k[8:]: v for k, v in problem.params.items() if k.startswith("encoder.")}, xs)
    w0, b0 = problem.params["head.weight"], problem.params["head.bias"]
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(4):
        loss = F.cross_entropy(feats @ w.T + b, ys)
        gw, gb = torch.autograd.grad(loss, [w, b])
        vw, vb = MU * vw + gw + LAM * (w - w0), MU * vb + gb + LAM * (b - b0)
        w, b = (w - 0.3 * vw).detach().requires_grad_(), (b - 0.3 * vb).detach().requires_grad_()
    torch.testing.assert_close(result.head.weight, w.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(result.head.bias, b.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_evaluation_with_momentum_runs_each_step_count_from_the_start(make_problem, adapt):
    problem = make_problem("mlp", head="random")
    algo = problem.algorithm(adapt=adapt, inner_momentum=MU, inner_steps=1)
    accs = algo.evaluate(problem.params, problem.batch, 3)
    for t in range(4):
        expected = []
        for i in range(problem.batch.support_y.shape[0]):
            xs, ys = problem.batch.support_x[i], problem.batch.support_y[i]
            result = sgd_steps(problem.model, problem.params, Support(ys, images=xs),
                               InnerConfig(t, problem.inner_lr, MU, adapt, "first_order"))
            phi = problem.model.encode(result.encoder, problem.batch.query_x[i])
            logits = phi @ result.head.weight.T + result.head.bias
            expected.append((logits.argmax(-1) == problem.batch.query_y[i]).double().mean())
        assert accs[:, t].tolist() == pytest.approx(torch.stack(expected).tolist(), abs=1e-12)
