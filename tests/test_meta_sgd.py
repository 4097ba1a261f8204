"""The Meta-SGD plugin (``algorithms/meta_sgd.py``): learned inner learning rates as meta-parameters.

The oracle is a literal Meta-SGD written with plain autograd: ``functional_call`` of the whole
model, ``F.cross_entropy``, ``torch.autograd.grad`` (``create_graph`` for second order) and the
update ``p ← p − α_p ⊙ ∇_p L_S`` on every parameter (``α_p`` the encoder tensor's own rates; the
head's scalar rate on ``head.weight`` and ``head.bias``), differentiated with respect to the
network *and* the rates. It shares nothing with the plugin but the model. The plugin class is
registered here directly (the ``bilevel.algorithms`` entry point needs an install), in a copy of
the engine's registry.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch.func import functional_call

import bilevel.algorithm as engine
from algorithms.meta_sgd import LR_HEAD, LR_PREFIX, MetaSGD
from bilevel.algorithm import algorithm_config, register
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app.config.schema import register_configs
from bilevel.errors import ConfigError
from bilevel.primitives.params import ENCODER_PREFIX, is_head
from bilevel.app.train import train

pytestmark = pytest.mark.usefixtures("single_thread")
LR = 0.4


@pytest.fixture
def meta_sgd(monkeypatch):
    """``meta_sgd(model, **config)``: the plugin with a validated config."""
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("meta_sgd")(MetaSGD)
    return lambda model, **cfg: MetaSGD(model, algorithm_config({"name": "meta_sgd", "inner_lr": LR, **cfg}))


def rate_of(params, key):
    return params[LR_HEAD] if is_head(key) else params[LR_PREFIX + key[len(ENCODER_PREFIX):]]


def literal_meta_loss(model, params, batch, steps, first_order=False):
    net = [k for k in params if is_head(k) or k.startswith(ENCODER_PREFIX)]
    losses = []
    for i in range(batch.support_y.shape[0]):
        fast = {k: params[k] for k in net}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - rate_of(params, k) * g for (k, v), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(functional_call(model, fast, (batch.query_x[i],)), batch.query_y[i]))
    return torch.stack(losses).mean()


def literal_meta_grad(model, params, batch, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(literal_meta_loss(model, leaves, batch, **kw), list(leaves.values()))
    return dict(zip(leaves, grads))


def problem(make_problem, meta_sgd, name="mlp", head="random", **cfg):
    """A tiny problem, the plugin and its meta-parameters with unequal rates around ``inner_lr``."""
    p = make_problem(name, shots=2, head=head)
    algo = meta_sgd(p.model, **cfg)
    params = algo.meta_parameters(p.params)
    gen = torch.Generator().manual_seed(1)
    for k in params:
        if k.startswith("meta_sgd."):
            params[k] = params[k] * (0.5 + torch.rand(params[k].shape, generator=gen, dtype=params[k].dtype))
    return p, algo, params


def test_meta_parameters_add_the_rates(make_problem, meta_sgd):
    p = make_problem("mlp")
    params = meta_sgd(p.model).meta_parameters(p.params)
    extra = sorted(set(params) - set(p.params))
    encoder = [k for k in p.params if k.startswith(ENCODER_PREFIX)]
    assert extra == sorted([LR_HEAD] + [LR_PREFIX + k[len(ENCODER_PREFIX):] for k in encoder])
    assert not any(k.startswith(ENCODER_PREFIX) or is_head(k) for k in extra)
    assert params[LR_HEAD].shape == () and all(params[LR_PREFIX + k[8:]].shape == p.params[k].shape for k in encoder)
    assert all(torch.all(params[k] == LR) and params[k].dtype == torch.float64 for k in extra)
    with pytest.raises(KeyError, match="meta_parameters"):
        meta_sgd(p.model).meta_grad(p.params, p.batch)
    for bad in ({"adapt": "head"}, {"inner_momentum": 0.9}, {"inner_lr": -1.0}):
        with pytest.raises(ConfigError):
            meta_sgd(p.model, **bad)


@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_matches_literal_meta_sgd(make_problem, rel_err, meta_sgd, order, steps):
    p, algo, params = problem(make_problem, meta_sgd, inner_steps=steps, order=order)
    step = algo.meta_grad(params, p.batch)
    ref = literal_meta_grad(p.model, params, p.batch, steps=steps, first_order=order == "first_order")
    assert rel_err(step.grad, ref) < 1e-10
    assert float(step.grad[LR_HEAD].abs()) > 0 and float(step.grad[LR_PREFIX + "layers.0.weight"].abs().max()) > 0


def test_meta_gradient_matches_central_differences(make_problem, meta_sgd):
    p, algo, params = problem(make_problem, meta_sgd, inner_steps=2)
    grad, h = algo.meta_grad(params, p.batch).grad, 1e-6
    for key, index in [(LR_HEAD, ()), (LR_PREFIX + "layers.0.weight", (2, 1)), ("encoder.layers.1.weight", (0, 3)),
                       ("head.weight", (1, 4))]:
        def loss(delta):
            shifted = {**params, key: params[key].clone()}
            shifted[key][index] += delta
            return float(algo.meta_grad(shifted, p.batch).loss)
        fd = (loss(h) - loss(-h)) / (2 * h)
        assert abs(fd - float(grad[key][index])) < 1e-7 * max(1.0, abs(fd)), key


@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 2])
def test_equal_rates_are_maml(make_problem, meta_sgd, order, steps):
    """Every rate α: the network's meta-gradient is MAML's with step α, bit for bit on the loop."""
    p = make_problem("mlp", shots=2)
    algo = meta_sgd(p.model, inner_steps=steps, order=order)
    grad = algo.meta_grad(algo.meta_parameters(p.params), p.batch).grad
    maml = p.algorithm(inner_steps=steps, order=order, inner_lr=LR).meta_grad(p.params, p.batch).grad
    assert all(torch.equal(grad[k], maml[k]) for k in maml)


def test_vmap_and_loop_agree(make_problem, rel_err, meta_sgd):
    p, algo, params = problem(make_problem, meta_sgd, "conv4", inner_steps=2)
    assert algo.executions == ("vmap", "loop")
    out = {}
    for execution in algo.executions:
        algo = algo.with_execution(execution)
        out[execution] = algo.meta_grad(params, p.batch, decompose=True)
    assert rel_err(out["vmap"].grad, out["loop"].grad) < 1e-10
    for term in algo.terms:
        assert rel_err(out["vmap"].decomposition.terms[term], out["loop"].decomposition.terms[term]) < 1e-10


@pytest.mark.parametrize("execution", ["loop", "vmap"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("head", ["random", "zero"])
def test_decomposition_is_exact(make_problem, rel_err, meta_sgd, execution, order, head):
    p, algo, params = problem(make_problem, meta_sgd, head=head, inner_steps=2, order=order)
    algo = algo.with_execution(execution)
    step = algo.meta_grad(params, p.batch, decompose=True)
    d = step.decomposition
    assert float(d.identity_error) < 1e-10 and float(d.reconstruction_error) < 1e-10
    assert all(torch.equal(d.total[k], step.grad[k]) for k in step.grad)
    assert rel_err(step.grad, literal_meta_grad(p.model, params, p.batch, steps=2,
                                                first_order=order == "first_order")) < 1e-10
    ablated = algo.ablated_meta_grad(params, p.batch, keep=("contrastive",)).grad
    assert rel_err(ablated, d.combine(("contrastive",))) < 1e-10
    if order == "second_order" and execution == "vmap":
        assert d.encoder_adaptation is not None and set(d.encoder_adaptation) == set(params)


def test_evaluation_uses_the_learned_rates(make_problem, meta_sgd):
    p, algo, params = problem(make_problem, meta_sgd, inner_steps=2)
    accs = algo.evaluate(params, p.batch, 3)
    assert accs.shape == (2, 4)
    fast = {k: params[k] for k in p.params}
    for _ in range(2):  # two literal steps on task 0, the learned rates
        leaves = {k: v.clone().requires_grad_() for k, v in fast.items()}
        loss = F.cross_entropy(functional_call(p.model, leaves, (p.batch.support_x[0],)), p.batch.support_y[0])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        fast = {k: v - rate_of(params, k) * g for (k, v), g in zip(fast.items(), grads)}
    logits = functional_call(p.model, fast, (p.batch.query_x[0],))
    assert float(accs[0, 2]) == float((logits.argmax(-1) == p.batch.query_y[0]).double().mean())


def test_training_learns_the_rates(tmp_path, meta_sgd):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=[
            "algorithm=meta_sgd", "data=synthetic", "model=mlp", "model.hidden=16", "data.queries=3",
            "data.synthetic_dim=8", "train.steps=4", "train.meta_batch=2", "train.eval_every=2",
            "train.log_every=2", "train.checkpoint_every=2", "train.decompose_every=2", "eval.tasks=4",
            "eval.final_tasks=4", "device=cpu", "execution=vmap"])
    metrics = train(cfg, tmp_path, show_progress=False)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    final = load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))["params"]
    assert LR_HEAD in final and float(final[LR_HEAD]) != cfg.algorithm.inner_lr
    assert not torch.all(final[LR_PREFIX + "layers.0.weight"] == cfg.algorithm.inner_lr)
