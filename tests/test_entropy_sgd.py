"""Entropy-SGD plugin and the chain's decomposition (docs/theory.md §6), in float64 on tiny problems.

References are independent of ``bilevel.hypergrad.chain``: a literal Algorithm 1 (``x'``, ``μ`` kept as
parameters, gradients by ``torch.autograd`` through ``functional_call`` of the whole model
and ``F.cross_entropy``), closed-form noise statistics, and autograd of the one-sided
contrastive surrogate.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel import build_algorithm
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, encoder_part, is_head
from bilevel.testing import rel_err, seeded_problem

DT = torch.float64
WAYS, SHOTS, QUERIES, TASKS, SHAPE = 3, 2, 2, 2, (6,)


def _problem(seed=0, tasks=TASKS, shape=SHAPE, model_name="mlp", hidden=8):
    """A seeded model, its parameters and a batch whose tasks relabel their classes at random."""
    p = seeded_problem(model_name, ways=WAYS, shots=SHOTS, queries=QUERIES, tasks=tasks, shape=shape, hidden=hidden,
                       permute=True, seed=seed)
    return p.model, p.params, p.batch


def _algo(model, **overrides):
    cfg = {"name": "entropy_sgd", "inner_steps": 3, "inner_lr": 0.1, "gamma0": 2.0, "gamma1": 0.1,
           "noise": 0.05, "ema": 0.6, "adapt": "all", "batches": "pooled", "seed": 7}
    cfg.update(overrides)
    return build_algorithm(cfg, model)


def _loss(model, params, x, y):
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def _reference(model, params, batch, L, lr, gamma, eps, a, adapt, seed):
    """Literal Algorithm 1 per task (pooled batch), mean of d over tasks; the encoder, when not
    adapted, follows the EMA of its gradients started at the first one."""
    gen = torch.Generator().manual_seed(seed)
    moving = [k for k in params if adapt == "all" or is_head(k)]
    tasks = batch.support_y.shape[0]
    noise = {k: torch.randn((tasks, L, *params[k].shape), generator=gen, dtype=DT) for k in sorted(moving)} if eps else {}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(tasks):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        xp = {k: v.clone() for k, v in params.items()}
        mu = {k: v.clone() for k, v in params.items()}
        nu = None
        for l in range(L):
            leaves = {k: v.clone().requires_grad_(True) for k, v in xp.items()}
            grads = dict(zip(leaves, torch.autograd.grad(_loss(model, leaves, x, y), list(leaves.values()))))
            frozen = {k: g for k, g in grads.items() if k not in moving}
            nu = frozen if nu is None else {k: (1 - a) * nu[k] + a * g for k, g in frozen.items()}
            for k in moving:
                dx = grads[k] - gamma * (params[k] - xp[k])
                xp[k] = xp[k] - lr * dx + (math.sqrt(lr) * eps * noise[k][i, l] if eps else 0.0)
                mu[k] = (1 - a) * mu[k] + a * xp[k]
        for k in params:
            total[k] += (gamma * (params[k] - mu[k]) if k in moving else nu[k]) / tasks
    return total


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_direction_matches_literal_algorithm_and_decomposition_identity(adapt):
    model, params, batch = _problem()
    algo = _algo(model, adapt=adapt)
    plain = algo.meta_grad(params, batch)
    ref = _reference(model, params, batch, 3, 0.1, 2.0, 0.05, 0.6, adapt, seed=7)
    assert rel_err(plain.grad, ref) < 1e-10
    algo.load_state_dict({"outer_steps": 0, "generator": None})
    step = algo.meta_grad(params, batch, decompose=True)
    d = step.decomposition
    assert rel_err(step.grad, plain.grad) == 0.0
    summed = {k: sum(t[k] for t in d.terms.values()) for k in params}
    assert rel_err(summed, plain.grad) < 1e-10
    assert float(d.identity_error) < 1e-10
    assert float(d.reconstruction_error) < 1e-10
    expected = ("contrastive", "init", "noise") + (("encoder_noise",) if adapt == "all" else ())
    assert algo.terms == expected
    for name, term in d.terms.items():
        enc = torch.cat([v.flatten() for k, v in term.items() if not is_head(k)])
        assert float(enc.norm()) > 0, name
    assert float(d.terms["contrastive"][HEAD_WEIGHT].abs().max()) == 0.0


def test_conv4_batchnorm_identity():
    model, params, batch = _problem(shape=(1, 16, 16), model_name="conv4")
    algo = _algo(model, inner_steps=2)
    algo = algo.with_execution("loop")
    d = algo.meta_grad(params, batch, decompose=True).decomposition
    ref = _reference(model, params, batch, 2, 0.1, 2.0, 0.05, 0.6, "all", seed=7)
    assert rel_err(d.total, ref) < 1e-10
    assert float(d.identity_error) < 1e-10 and float(d.reconstruction_error) < 1e-10


@pytest.mark.parametrize("gamma", [0.5, 1e4])
def test_one_step_without_noise_is_a_plain_sgd_step(gamma):
    """L = 1, ε = 0: x'_0 = x, so the coupling never acts and d = a η' γ ∇f_B(x) exactly."""
    model, params, batch = _problem()
    algo = _algo(model, inner_steps=1, noise=0.0, gamma0=gamma, ema=0.6)
    d = algo.meta_grad(params, batch).grad
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    per_task = sum(_loss(model, leaves, x[i * y.shape[1]:(i + 1) * y.shape[1]], y[i]) for i in range(TASKS)) / TASKS
    grads = dict(zip(leaves, torch.autograd.grad(per_task, list(leaves.values()))))
    expected = {k: 0.6 * 0.1 * gamma * g for k, g in grads.items()}
    assert rel_err(d, expected) < 1e-12


def test_scoping_counter_advances_and_survives_resume():
    model, params, batch = _problem()
    algo = _algo(model)
    opt = algo.make_outer_optimizer([torch.zeros(1)], lr=123.0)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 1.0
    for _ in range(3):
        algo.meta_grad(params, batch)
        algo.outer_step_done()
    assert algo.gamma == pytest.approx(2.0 * 1.1 ** 3, rel=1e-14)
    state = algo.state_dict()
    resumed = _algo(model)
    resumed.load_state_dict(state)
    a, b = algo.meta_grad(params, batch), resumed.meta_grad(params, batch)
    assert float(b.extras["entropy_sgd/gamma"]) == pytest.approx(2.0 * 1.1 ** 3, rel=1e-14)
    assert rel_err(b.grad, a.grad) == 0.0
    again = algo.meta_grad(params, batch)
    assert rel_err(again.grad, a.grad) > 1e-3


def _dead_problem(tasks, hidden):
    """Zero inputs and ReLU biases of −10: features ≡ 0, so the encoder and head.weight gradients
    vanish exactly along the whole (small-noise) chain."""
    model, params, batch = _problem(tasks=tasks, hidden=hidden)
    for k in params:
        if k.startswith("encoder.") and k.endswith("bias"):
            params[k].fill_(-10.0)
    batch.support_x.zero_()
    batch.query_x.zero_()
    return model, params, batch


@pytest.mark.parametrize("steps,ema,gamma", [(1, 1.0, 1.0), (2, 0.5, 2.0)])
def test_noise_variance_matches_convention(steps, ema, gamma):
    """Zero gradient, so ``μ_L − x = −d/γ`` is pure noise: per coordinate its variance is
    ``η' ε²`` for L = 1, a = 1, and ``a² η' ε² ((1 − a + ρ)² + 1)`` for L = 2 (ρ = 1 − η'γ).
    The meta-gradient averages T tasks, so ``sqrt(T) d / γ`` has that variance."""
    lr, eps, tasks = 0.1, 0.03, 2
    model, params, batch = _dead_problem(tasks, hidden=32)
    algo = _algo(model, inner_steps=steps, inner_lr=lr, noise=eps, ema=ema, gamma0=gamma, gamma1=0.0)
    algo = algo.with_execution("loop")
    keys = [k for k in params if k != HEAD_BIAS]
    draws = []
    for _ in range(12):
        d = algo.meta_grad(params, batch).grad
        draws.append(torch.cat([d[k].flatten() for k in keys]) * math.sqrt(tasks) / gamma)
    samples = torch.cat(draws)
    rho = 1.0 - lr * gamma
    expected = lr * eps ** 2 * (1.0 if steps == 1 else ema ** 2 * ((1 - ema + rho) ** 2 + 1))
    assert samples.numel() > 10_000
    assert float(samples.var()) == pytest.approx(expected, rel=0.04)
    assert abs(float(samples.mean())) < 4 * math.sqrt(expected / samples.numel())


def test_contrastive_term_is_one_sided():
    """Head-only chain (frozen encoder, pooled batch): the contrastive term equals the gradient of
    ``Σ_ℓ v_ℓ Σ_{τ<ℓ} sg(C^ℓ_τ[s,q]) ⟨sg(φ_s), φ_q⟩`` (earlier steps' features are constants);
    the support side, which a two-sided learner would add, is non-zero."""
    L, lr, gamma, eps, a = 3, 0.1, 2.0, 0.05, 0.6
    model, params, batch = _problem()
    algo = _algo(model, adapt="head")
    contrastive = algo.meta_grad(params, batch, decompose=True).decomposition.terms["contrastive"]
    gen = torch.Generator().manual_seed(7)
    noise = {k: torch.randn((TASKS, L, *params[k].shape), generator=gen, dtype=DT) for k in (HEAD_BIAS, HEAD_WEIGHT)}
    rho, amp = 1 - lr * gamma, math.sqrt(lr) * eps
    v = [(1 - a) ** (L - 1)] + [a * (1 - a) ** (L - l) for l in range(2, L + 1)]
    enc = {k: t.clone().requires_grad_(True) for k, t in encoder_part(params).items()}
    query_side, support_side = 0.0, 0.0
    for i in range(TASKS):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = F.one_hot(torch.cat([batch.support_y[i], batch.query_y[i]]), WAYS).to(DT)
        phi = functional_call(model.encoder, enc, (x,))
        f = phi.detach()
        w, b = params[HEAD_WEIGHT].clone(), params[HEAD_BIAS].clone()
        grads = []
        for l in range(L):
            g = (torch.softmax(f @ w.T + b, -1) - y) / y.shape[0]
            for tau, g_tau in enumerate(grads):
                c = (-lr * rho ** (l - 1 - tau) * g_tau) @ g.T
                query_side = query_side + v[l] / TASKS * (c * (f @ phi.T)).sum()
                support_side = support_side + v[l] / TASKS * (c * (phi @ f.T)).sum()
            grads.append(g)
            w = params[HEAD_WEIGHT] + rho * (w - params[HEAD_WEIGHT]) - lr * g.T @ f + amp * noise[HEAD_WEIGHT][i, l]
            b = params[HEAD_BIAS] + rho * (b - params[HEAD_BIAS]) - lr * g.sum(0) + amp * noise[HEAD_BIAS][i, l]
    q_grad = dict(zip(enc, torch.autograd.grad(query_side, list(enc.values()), retain_graph=True)))
    s_grad = dict(zip(enc, torch.autograd.grad(support_side, list(enc.values()))))
    engine = {k: contrastive["encoder." + k] for k in enc}
    assert rel_err(engine, q_grad) < 1e-10
    assert rel_err(s_grad, q_grad) > 1e-3


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_vmap_equals_loop(adapt):
    model, params, batch = _problem()
    out = {}
    for execution in ("vmap", "loop"):
        algo = _algo(model, adapt=adapt)
        algo = algo.with_execution(execution)
        out[execution] = algo.meta_grad(params, batch, decompose=True)
    assert rel_err(out["vmap"].grad, out["loop"].grad) < 1e-12
    for name, term in out["loop"].decomposition.terms.items():
        assert rel_err(out["vmap"].decomposition.terms[name], term) < 1e-10
    assert float((out["vmap"].decomposition.pair_weights - out["loop"].decomposition.pair_weights).abs().max()) < 1e-12


def test_evaluate_is_plain_sgd_on_the_support():
    model, params, batch = _problem()
    algo = _algo(model, inner_lr=0.3)
    accs = algo.evaluate(params, batch, 2)
    expected = []
    for i in range(TASKS):
        p = {k: v.clone() for k, v in params.items()}
        row = []
        for t in range(3):
            if t:
                leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
                gs = torch.autograd.grad(_loss(model, leaves, batch.support_x[i], batch.support_y[i]), list(leaves.values()))
                p = {k: v - 0.3 * g for (k, v), g in zip(p.items(), gs)}
            pred = functional_call(model, p, (batch.query_x[i],)).argmax(-1)
            row.append((pred == batch.query_y[i]).to(DT).mean())
        expected.append(torch.stack(row))
    assert torch.equal(accs, torch.stack(expected))


def test_bad_config_is_a_clear_error():
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="batches"):
        _algo(model, batches="both")
    with pytest.raises(ValueError, match="ema"):
        _algo(model, ema=0.0)
