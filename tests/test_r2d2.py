"""The R2-D2 plugin (``algorithms/r2d2.py``): a closed-form ridge head, built from public engine parts.

The oracle is the *primal* ridge regression, written with plain autograd: the head
``[W, b]ᵀ = s ([Φ, 1]ᵀ[Φ, 1] + λI)⁻¹ [Φ, 1]ᵀ Y`` (a ``(d + 1) × (d + 1)`` solve) and
``F.cross_entropy`` of the query logits. The plugin solves the dual (``n × n``) system and
writes ``W = AᵀΦ``; the two agree by the Woodbury identity, so the oracle shares nothing with
the plugin but the model. The plugin class is registered here directly (the
``bilevel.algorithms`` entry point needs an install), in a copy of the engine's registry.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch.func import functional_call

import bilevel.algorithm as engine
from bilevel import Support
from algorithms.r2d2 import R2D2, ridge_coefficients
from bilevel.algorithm import algorithm_config, register
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app.config.schema import register_configs
from bilevel.app.setup import setup
from bilevel.app.train import train
from bilevel.primitives.params import ENCODER_PREFIX, encoder_part, is_head

pytestmark = pytest.mark.usefixtures("single_thread")
LAM, SCALE = 0.7, 2.5


@pytest.fixture
def r2d2(monkeypatch):
    """``r2d2(model, **config)``: the plugin with a validated config."""
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("r2d2")(R2D2)
    return lambda model, **cfg: R2D2(model, algorithm_config({"name": "r2d2", "lam": LAM, "scale": SCALE, **cfg}))


def primal_meta_loss(model, params, batch, lam, scale, first_order=False):
    """Mean query cross-entropy after primal ridge regression on ``[Φ, 1]`` (plain autograd)."""
    encoder = encoder_part(params)
    losses = []
    for i in range(batch.support_y.shape[0]):
        phi_s = functional_call(model.encoder, encoder, (batch.support_x[i],))
        phi_q = functional_call(model.encoder, encoder, (batch.query_x[i],))
        if first_order:
            phi_s = phi_s.detach()
        x = torch.cat([phi_s, torch.ones_like(phi_s[:, :1])], 1)
        y = F.one_hot(batch.support_y[i], model.ways).to(x.dtype)
        head = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
        logits = scale * torch.cat([phi_q, torch.ones_like(phi_q[:, :1])], 1) @ head
        losses.append(F.cross_entropy(logits, batch.query_y[i]))
    return torch.stack(losses).mean()


def primal_meta_grad(model, params, batch, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items() if not is_head(k)}
    grads = torch.autograd.grad(primal_meta_loss(model, leaves, batch, **kw), list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("head", ["random", "zero"])
def test_meta_gradient_matches_primal_ridge_and_the_head_gets_none(make_problem, rel_err, r2d2, order, head):
    p = make_problem("mlp", shots=2, head=head)
    step = r2d2(p.model, order=order).meta_grad(p.params, p.batch)
    ref = primal_meta_grad(p.model, p.params, p.batch, lam=LAM, scale=SCALE, first_order=order == "first_order")
    assert rel_err({k: step.grad[k] for k in ref}, ref) < 1e-10
    assert abs(float(step.loss) - float(primal_meta_loss(p.model, p.params, p.batch, lam=LAM, scale=SCALE))) < 1e-12
    assert all(torch.count_nonzero(step.grad[k]) == 0 for k in step.grad if is_head(k))


def test_meta_gradient_matches_central_differences(make_problem, r2d2):
    p = make_problem("mlp", shots=2)
    algo = r2d2(p.model)
    grad, h = algo.meta_grad(p.params, p.batch).grad, 1e-6
    for key, index in [("encoder.layers.0.weight", (3, 1)), ("encoder.layers.1.bias", (5,))]:
        def loss(delta):
            shifted = {**p.params, key: p.params[key].clone()}
            shifted[key][index] += delta
            return float(algo.meta_grad(shifted, p.batch).loss)
        fd = (loss(h) - loss(-h)) / (2 * h)
        assert abs(fd - float(grad[key][index])) < 1e-7 * max(1.0, abs(fd)), key


def test_ridge_solution_satisfies_the_normal_equations(make_problem, r2d2):
    p = make_problem("mlp", shots=2)
    algo = r2d2(p.model)
    xs, ys = p.batch.support_x[0], p.batch.support_y[0]
    inner = algo.inner_loop(p.params, Support(ys, images=xs), algo.config.inner)
    phi = p.model.encode(encoder_part(p.params), xs)
    x = torch.cat([phi, torch.ones_like(phi[:, :1])], 1)
    head = torch.cat([inner.head.weight, inner.head.bias[:, None]], 1).T  # [d + 1, N]
    y = F.one_hot(ys, p.ways).to(x.dtype)
    residual = (x.T @ x + LAM * torch.eye(x.shape[1], dtype=x.dtype)) @ head - SCALE * x.T @ y
    assert float(residual.abs().max()) < 1e-12
    coeff = ridge_coefficients(phi, ys, p.ways, LAM)
    assert torch.allclose((phi @ phi.T + 1 + LAM * torch.eye(len(ys), dtype=x.dtype)) @ coeff, y, atol=1e-13)
    assert len(inner.head.trace.coeffs) == 1 and torch.equal(inner.head.trace.coeffs[0], SCALE * coeff)
    assert torch.count_nonzero(inner.head.trace.weight0) == 0 and torch.count_nonzero(inner.head.trace.bias0) == 0


@pytest.mark.parametrize("name", ["mlp", "conv4"])
def test_vmap_loop_and_shared_agree(make_problem, rel_err, r2d2, name):
    p = make_problem(name, shots=2)
    algo = r2d2(p.model)
    assert algo.executions == ("vmap", "loop", "shared")
    out = {}
    for execution in algo.executions:
        algo = algo.with_execution(execution)
        out[execution] = algo.meta_grad(p.params, p.batch, decompose=True)
    enc = lambda g: {k: v for k, v in g.items() if not is_head(k)}  # noqa: E731  (the head's are exact zeros)
    for execution in ("vmap", "shared"):
        assert rel_err(enc(out[execution].grad), enc(out["loop"].grad)) < 1e-10
        for term in algo.terms:
            a, b = out[execution].decomposition.terms[term], out["loop"].decomposition.terms[term]
            assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12, (execution, term)


@pytest.mark.parametrize("execution", ["loop", "vmap", "shared"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_decomposition_is_exact(make_problem, rel_err, r2d2, execution, order):
    p = make_problem("mlp", shots=2)
    algo = r2d2(p.model, order=order)
    algo = algo.with_execution(execution)
    step = algo.meta_grad(p.params, p.batch, decompose=True)
    d = step.decomposition
    assert float(d.reconstruction_error) < 1e-10
    summed = {k: sum(d.terms[t][k] for t in algo.terms) for k in d.total if not is_head(k)}
    assert rel_err(summed, {k: d.total[k] for k in summed}) < 1e-10  # the encoder, which the terms explain
    ablated = algo.ablated_meta_grad(p.params, p.batch, keep=("contrastive",)).grad
    assert rel_err(ablated, d.combine(("contrastive",))) < 1e-10
    assert float(d.identity_error) < 1e-10  # over all parameters, the head's (exact zeros) included


@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_r2d2_is_a_pure_contrastive_learner(make_problem, r2d2, order):
    """``W_0 = 0``: no init interference on the encoder, whatever the meta head; first order has no
    coefficient path either, so its encoder meta-gradient *is* the contrastive term."""
    p = make_problem("mlp", shots=2, head="random")
    d = r2d2(p.model, order=order).meta_grad(p.params, p.batch, decompose=True).decomposition
    encoder = [k for k in d.total if k.startswith(ENCODER_PREFIX)]
    assert all(torch.count_nonzero(d.terms["init"][k]) == 0 for k in encoder)
    coefficient = sum(float(d.terms["coefficient"][k].abs().max()) for k in encoder)
    if order == "first_order":
        assert coefficient == 0.0
        assert all(torch.allclose(d.terms["contrastive"][k], d.total[k], rtol=0, atol=1e-14) for k in encoder)
    else:
        assert coefficient > 1e-6  # (K + λI)⁻¹ depends on the encoder


def test_evaluation_is_chance_then_the_solve(make_problem, r2d2):
    p = make_problem("mlp", shots=2, head="zero")
    accs = r2d2(p.model).evaluate(p.params, p.batch, 3)
    assert accs.shape == (2, 4)
    assert torch.equal(accs[:, 0], torch.full((2,), 1 / p.ways, dtype=accs.dtype))  # a zero head ties: class 0
    assert all(torch.equal(accs[:, t], accs[:, 1]) for t in (2, 3))
    algo = r2d2(p.model)
    inner = algo.inner_loop(p.params, Support(p.batch.support_y[1], images=p.batch.support_x[1]), algo.config.inner)
    phi_q = p.model.encode(encoder_part(p.params), p.batch.query_x[1])
    logits = phi_q @ inner.head.weight.T + inner.head.bias
    assert float(accs[1, 1]) == float((logits.argmax(-1) == p.batch.query_y[1]).double().mean())


def fast_config(*overrides: str):
    """A few outer steps on synthetic data with an MLP (the FAST run of ``tests/test_train.py``)."""
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=[
            "data=synthetic", "model=mlp", "model.hidden=16", "data.queries=3", "data.synthetic_dim=8",
            "train.steps=6", "train.meta_batch=2", "train.eval_every=3", "train.log_every=2",
            "train.checkpoint_every=3", "train.decompose_every=2", "train.image_every=4", "eval.tasks=4",
            "eval.final_tasks=4", "device=cpu", *overrides])


def test_training_runs_and_leaves_the_meta_head_alone(tmp_path, r2d2):
    cfg = fast_config("algorithm=r2d2", "head.policy=random", "execution=shared")
    start = setup(cfg).params
    metrics = train(cfg, tmp_path, show_progress=False)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    state = load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))
    assert state["step"] == 6
    final = state["params"]
    assert all(torch.equal(final[k], start[k]) for k in final if is_head(k))  # zero gradient: Adam leaves it
    assert all(not torch.equal(final[k], start[k]) for k in final if not is_head(k))


def test_structural_zeros_describe_r2d2(make_problem, r2d2):
    from bilevel.decomposition.structural import structural_zeros

    p = make_problem("mlp", shots=2, head="zero")
    algo = r2d2(p.model)
    d = algo.meta_grad(p.params, p.batch, decompose=True).decomposition
    assert float(d.terms["coefficient"]["encoder.layers.0.weight"].abs().max()) > 1e-6
    for policy in ("zeroing", "random"):
        assert set(structural_zeros(algo, policy)) == {"init"}
