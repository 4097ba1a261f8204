"""The example plugins ``examples/boil.py`` (a head-frozen inner loop) and ``examples/protomaml.py``
(a prototype-initialised head), found through the entry points their ``examples/pyproject.toml``
declares.

No pip: a ``bilevel_examples-0.1.0.dist-info`` holding those entry points is written into a
temporary directory on ``sys.path`` next to ``examples/`` (what an installed distribution looks
like to ``importlib.metadata``). In float64 on a tiny MLP, each plugin's meta-gradient is checked
against a literal implementation written with ``functional_call`` + ``F.cross_entropy`` +
``torch.autograd.grad`` (itself checked against a central finite difference), and its
decomposition against the identity and reconstruction checks on the ``loop`` and ``vmap`` paths.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel.algorithm as engine
from bilevel import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, build_algorithm, structural_zeros, tags
from bilevel.testing import rel_err, seeded_problem

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ORDERS = ["second_order", "first_order"]
LR, STEPS = 0.3, 2


@pytest.fixture
def examples_installed(tmp_path, monkeypatch):
    declared = tomllib.loads((EXAMPLES / "pyproject.toml").read_text())["project"]["entry-points"]
    lines = [f"{name} = {target}" for name, target in declared["bilevel.algorithms"].items()]
    dist = tmp_path / "bilevel_examples-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bilevel-examples\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[bilevel.algorithms]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    yield
    for module in ("boil", "protomaml"):
        sys.modules.pop(module, None)


def _problem(seed=0):
    return seeded_problem("mlp", ways=3, shots=2, queries=2, tasks=2, shape=(6,), seed=seed)


def _logits(model, encoder, weight, bias, x):
    features = functional_call(model.encoder, encoder, (x,))
    return features @ weight.T + bias


def _encoder(params):
    return {k[len(ENCODER_PREFIX):]: v for k, v in params.items() if k.startswith(ENCODER_PREFIX)}


def _boil_adapt(model, params, xs, ys, steps, first_order):
    """Literal BOIL: SGD on the encoder's parameters only; the head is the meta head."""
    encoder, weight, bias = _encoder(params), params[HEAD_WEIGHT], params[HEAD_BIAS]
    for _ in range(steps):
        loss = F.cross_entropy(_logits(model, encoder, weight, bias, xs), ys)
        grads = torch.autograd.grad(loss, list(encoder.values()), create_graph=not first_order)
        encoder = {k: v - LR * g for (k, v), g in zip(encoder.items(), grads)}
    return encoder, weight, bias


def _proto_adapt(model, params, xs, ys, steps, first_order):
    """Literal ProtoMAML: W_0 = 2 c_k, b_0 = −‖c_k‖² from the class means of the support
    features, then SGD on the encoder and the head together. From W_0 on the head is a variable
    of its own: the inner gradients are partial derivatives (the encoder's inner steps start
    from a copy, so they do not see the path through the prototypes; the meta-gradient does)."""
    features = functional_call(model.encoder, _encoder(params), (xs,))
    prototypes = torch.stack([features[ys == k].mean(0) for k in range(model.ways)])
    weight, bias = 2 * prototypes, -(prototypes ** 2).sum(1)
    encoder = {k: v.clone() for k, v in _encoder(params).items()}
    for _ in range(steps):
        loss = F.cross_entropy(_logits(model, encoder, weight, bias, xs), ys)
        leaves = list(encoder.values()) + [weight, bias]
        grads = torch.autograd.grad(loss, leaves, create_graph=not first_order)
        encoder = {k: v - LR * g for (k, v), g in zip(encoder.items(), grads)}
        weight, bias = weight - LR * grads[-2], bias - LR * grads[-1]
    return encoder, weight, bias


REFERENCES = {"boil": _boil_adapt, "protomaml": _proto_adapt}


def _meta_loss(name, model, params, batch, first_order):
    losses = []
    for i in range(batch.support_y.shape[0]):
        encoder, w, b = REFERENCES[name](model, params, batch.support_x[i], batch.support_y[i], STEPS, first_order)
        losses.append(F.cross_entropy(_logits(model, encoder, w, b, batch.query_x[i]), batch.query_y[i]))
    return torch.stack(losses).mean()


def _reference_grad(name, model, params, batch, first_order):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = _meta_loss(name, model, leaves, batch, first_order)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


def _algorithm(name, model, order="second_order", execution=None):
    return build_algorithm({"name": name, "inner_steps": STEPS, "inner_lr": LR, "order": order}, model, execution)


@pytest.mark.parametrize("name", ["boil", "protomaml"])
def test_reference_matches_finite_differences(name):
    """The literal implementations are right: their second-order gradient along a random
    direction equals a central difference of their meta-loss."""
    p = _problem()
    grad = _reference_grad(name, p.model, p.params, p.batch, first_order=False)
    direction = {k: torch.randn_like(v) for k, v in p.params.items()}
    h = 1e-6
    loss = [_meta_loss(name, p.model, {k: (v + s * h * direction[k]).requires_grad_() for k, v in p.params.items()},
                       p.batch, False).detach() for s in (1, -1)]
    fd = (loss[0] - loss[1]) / (2 * h)
    analytic = sum((grad[k] * direction[k]).sum() for k in grad)
    assert abs(float(analytic - fd)) < 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("name", ["boil", "protomaml"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_meta_gradient_and_decomposition(examples_installed, name, order, execution):
    p = _problem()
    algorithm = _algorithm(name, p.model, order, execution)
    expected = _reference_grad(name, p.model, p.params, p.batch, first_order=order == "first_order")
    plain = algorithm.meta_grad(p.params, p.batch)
    assert rel_err(plain.grad, expected) < 1e-10
    step = algorithm.meta_grad(p.params, p.batch, decompose=True)
    d = step.decomposition
    assert float(d.identity_error) < 1e-10 and float(d.reconstruction_error) < 1e-10
    summed = {k: sum(d.terms[t][k] for t in d.terms) for k in expected}
    assert rel_err(summed, expected) < 1e-10
    for term, why in structural_zeros(algorithm, algorithm.head_policy).items():
        assert all(float(v.abs().max()) == 0.0 for k, v in d.terms[term].items() if k.startswith(ENCODER_PREFIX)), why


@pytest.mark.parametrize("order", ORDERS)
def test_boil_head_frozen_decomposition_is_init_alone(examples_installed, order):
    """An empty head trace: ``init`` is the whole meta-gradient, every term on the trace's entries
    is exactly 0 and declared so, the head is the meta head bit for bit (reconstruction exactly 0),
    and the decomposition says it has no pair weights instead of reporting them as 0."""
    p = _problem()
    algorithm = _algorithm("boil", p.model, order)
    d = algorithm.meta_grad(p.params, p.batch, decompose=True).decomposition
    assert rel_err(d.terms["init"], d.total) < 1e-12
    assert all(float(v.abs().max()) == 0.0 for t in ("contrastive", "coefficient") for v in d.terms[t].values())
    assert float(d.reconstruction_error) == 0.0
    assert set(structural_zeros(algorithm, "random")) == {"contrastive", "coefficient"}
    assert set(d.absent) == {"pair_weights", "feature_cosines"} and d.pair_weights.shape[1] == 0
    summary = d.summary()
    assert tags.PAIRS_SAME_CLASS not in summary and tags.COS_SAME_CLASS not in summary
    assert all(torch.isfinite(v) for v in summary.values())


def test_default_head_policies(examples_installed):
    p = _problem()
    assert _algorithm("boil", p.model).head_policy == "random"
    assert _algorithm("protomaml", p.model).head_policy == "zeroing"
    assert build_algorithm({"name": "maml"}, p.model).head_policy == "zeroing"


def test_boil_learns_nothing_from_a_zero_head(examples_installed):
    """Why BOIL declares ``head.policy=random``: from ``W_0 = 0`` the encoder never moves, so its
    meta-gradient is exactly 0."""
    p = seeded_problem("mlp", ways=3, shots=2, queries=2, tasks=2, shape=(6,), head="zero")
    grad = _algorithm("boil", p.model).meta_grad(p.params, p.batch).grad
    assert all(float(v.abs().max()) == 0.0 for k, v in grad.items() if k.startswith(ENCODER_PREFIX))


def test_protomaml_init_is_not_zero_under_zeroing(examples_installed):
    """``W_0`` comes from the prototypes, so a zero meta head leaves ``init`` (through the
    prototypes) non-zero; the plugin's structural zeros do not claim it."""
    p = seeded_problem("mlp", ways=3, shots=2, queries=2, tasks=2, shape=(6,), head="zero")
    algorithm = _algorithm("protomaml", p.model)
    d = algorithm.meta_grad(p.params, p.batch, decompose=True).decomposition
    assert "init" not in structural_zeros(algorithm, "zeroing")
    assert max(float(v.abs().max()) for k, v in d.terms["init"].items() if k.startswith(ENCODER_PREFIX)) > 1e-3


@pytest.mark.parametrize("name", ["boil", "protomaml"])
def test_evaluation_follows_the_literal_inner_loop(examples_installed, name):
    """Evaluation from the base: step 0 is the head the inner loop starts from (ProtoMAML: the
    prototype head, i.e. the prototypical network), step ``t`` the literal ``t``-step adaptation."""
    p = _problem(seed=3)
    steps = 3
    accuracies = _algorithm(name, p.model).evaluate(p.params, p.batch, steps)
    assert accuracies.shape == (2, steps + 1)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.params.items()}
    for i in range(2):
        for t in range(steps + 1):
            enc, w, b = REFERENCES[name](p.model, leaves, p.batch.support_x[i], p.batch.support_y[i], t, True)
            predicted = _logits(p.model, enc, w, b, p.batch.query_x[i]).argmax(-1)
            assert float(accuracies[i, t]) == float((predicted == p.batch.query_y[i]).double().mean())
