"""MAML meta-gradients (docs/theory.md §4) against independent computations, in float64.

* Second order: the engine's meta-gradient equals the plain-autograd oracle (< 1e-10) and
  central finite differences of the mean query loss after the unrolled inner loop.
* First order means ``θ_T = θ + sg(Δ(θ))``: the meta-gradient is the derivative of
  ``θ' ↦ L_Q(θ' + Δ)`` with the inner displacements ``Δ`` computed at the base point and
  held fixed; checked by finite differences of exactly that function.
* ``higher`` on conv4 (BatchNorm with batch statistics): second order through the
  differentiable optimiser; first order with ``track_higher_grads=False``, where ``higher``
  detaches the updated fast weights, so the first-order meta-gradient is the gradient of
  ``L_Q`` w.r.t. the final fast weights (encoder fast weights = θ when only the head adapts).
* Every execution path gives the same meta-gradient.
* First-order head-only: the support features get exactly zero gradient.
* Zeroing trick: with ``W = b = 0`` the encoder's first inner gradient is ``J_Φᵀ G_S W = 0``
  exactly, so one full-network step leaves the encoder bitwise unchanged.
* ``evaluate`` against the oracle's accuracies; with a zero head every logit ties at step 0,
  ``argmax`` returns class 0, and the accuracy is the fraction of queries labelled 0.
"""
from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel import InnerConfig, Support, build_algorithm, sgd_steps
from bilevel.primitives.head import readout
from bilevel.primitives.losses import cross_entropy
from bilevel.primitives.params import encoder_part

pytestmark = pytest.mark.usefixtures("single_thread")

ADAPT = ["all", "head"]
STEPS = [1, 3]
ORDERS = ["second_order", "first_order"]
FD_EPS = 1e-6
FD_TOL = 1e-7


def random_directions(params, count=6, seed=0):
    """``count`` random unit directions in parameter space (one dict each)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in params.items()}
        norm = sum(float(x.pow(2).sum()) for x in v.values()) ** 0.5
        out.append({k: x / norm for k, x in v.items()})
    return out


def assert_matches_central_differences(grad, f, params):
    """``⟨grad, v⟩ = (f(θ + εv) − f(θ − εv)) / 2ε`` up to ``FD_TOL · ‖grad‖``, random unit ``v``."""
    norm = sum(float(g.pow(2).sum()) for g in grad.values()) ** 0.5

    def at(v, sign):
        return {k: (params[k] + sign * FD_EPS * v[k]).requires_grad_() for k in params}

    for v in random_directions(params):
        fd = float((f(at(v, 1.0)) - f(at(v, -1.0))).detach()) / (2 * FD_EPS)
        exact = sum(float((grad[k] * v[k]).sum()) for k in grad)
        assert abs(fd - exact) < FD_TOL * norm, (fd, exact, norm)


@pytest.mark.parametrize("adapt", ADAPT)
@pytest.mark.parametrize("steps", STEPS)
def test_second_order_matches_oracle_and_finite_differences(make_problem, reference, rel_err, adapt, steps):
    p = make_problem("mlp")
    grad = p.algorithm(adapt=adapt, inner_steps=steps).meta_grad(p.params, p.batch).grad
    oracle = reference.meta_grad(p.model, p.params, p.batch, steps=steps, lr=p.inner_lr, adapt=adapt)
    # The loss value does not depend on the order; first_order only skips building graphs.
    loss = lambda q: reference.meta_loss(  # noqa: E731
        p.model, q, p.batch, steps=steps, lr=p.inner_lr, adapt=adapt, first_order=True
    )
    assert_matches_central_differences(oracle, loss, p.params)
    assert_matches_central_differences(grad, loss, p.params)
    assert rel_err(grad, oracle) < 1e-10


@pytest.mark.parametrize("adapt", ADAPT)
@pytest.mark.parametrize("steps", STEPS)
def test_first_order_is_gradient_with_frozen_inner_displacements(make_problem, reference, rel_err, adapt, steps):
    p = make_problem("mlp")
    b = p.batch
    grad = p.algorithm(adapt=adapt, inner_steps=steps, order="first_order").meta_grad(p.params, b).grad
    leaves = {k: v.clone().requires_grad_() for k, v in p.params.items()}
    shifts = []
    for i in range(b.support_y.shape[0]):
        fast = reference.adapt(
            p.model, leaves, b.support_x[i], b.support_y[i],
            steps=steps, lr=p.inner_lr, adapt=adapt, first_order=True,
        )
        shifts.append({k: (fast[k] - leaves[k]).detach() for k in leaves})

    def frozen(q):
        losses = [
            F.cross_entropy(functional_call(p.model, {k: q[k] + d[k] for k in q}, (b.query_x[i],)), b.query_y[i])
            for i, d in enumerate(shifts)
        ]
        return torch.stack(losses).mean().detach()

    assert_matches_central_differences(grad, frozen, p.params)
    oracle = reference.meta_grad(p.model, p.params, b, steps=steps, lr=p.inner_lr, adapt=adapt, first_order=True)
    assert rel_err(grad, oracle) < 1e-10
    second = p.algorithm(adapt=adapt, inner_steps=steps).meta_grad(p.params, b).grad
    assert rel_err(grad, second) > 1e-3


def higher_meta_grad(model, params, batch, *, steps, lr, adapt, order):
    """MAML through ``higher.innerloop_ctx`` on the module itself (``copy_initial_weights=False``)."""
    with torch.no_grad():
        for name, value in model.named_parameters():
            value.copy_(params[name])
    names = [n for n, _ in model.named_parameters()]
    adapted = [v for n, v in model.named_parameters() if adapt == "all" or n.startswith("head.")]
    total = {n: torch.zeros_like(v) for n, v in params.items()}
    tasks = batch.support_y.shape[0]
    for i in range(tasks):
        opt = torch.optim.SGD(adapted, lr=lr)
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, track_higher_grads=order == "second_order"
        ) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(batch.support_x[i]), batch.support_y[i]))
            loss = F.cross_entropy(fmodel(batch.query_x[i]), batch.query_y[i])
            wrt = list(model.parameters()) if order == "second_order" else list(fmodel.parameters())
            grads = torch.autograd.grad(loss, wrt)
        for n, g in zip(names, grads):
            total[n] += g / tasks
    return total


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("adapt", ADAPT)
@pytest.mark.parametrize("steps", STEPS)
def test_matches_higher_on_conv4(make_problem, rel_err, adapt, steps, order):
    p = make_problem("conv4")
    grad = p.algorithm(adapt=adapt, inner_steps=steps, order=order).meta_grad(p.params, p.batch).grad
    expected = higher_meta_grad(p.model, p.params, p.batch, steps=steps, lr=p.inner_lr, adapt=adapt, order=order)
    assert rel_err(grad, expected) < 1e-8


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("adapt", ADAPT)
def test_execution_paths_agree(make_problem, rel_err, adapt, order, dtype, tol):
    p = make_problem("conv4", dtype=dtype)
    algo = p.algorithm(adapt=adapt, inner_steps=2, order=order)
    assert set(algo.executions) == ({"vmap", "loop", "shared"} if adapt == "head" else {"vmap", "loop"})
    results = {}
    for mode in algo.executions:
        algo = algo.with_execution(mode)
        results[mode] = algo.meta_grad(p.params, p.batch)
    base = results["loop"]
    for mode, r in results.items():
        assert rel_err(r.grad, base.grad) < tol, mode
        assert torch.allclose(r.loss, base.loss, rtol=tol, atol=0), mode
        assert torch.equal(r.accuracy, base.accuracy), mode


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("head", ["random", "zero"])
def test_first_order_head_only_support_features_get_zero_gradient(make_problem, steps, head):
    p = make_problem("mlp", head=head)
    b = p.batch
    encoder = encoder_part(p.params)
    phi_s = p.model.encode(encoder, b.support_x[0]).detach().requires_grad_()
    phi_q = p.model.encode(encoder, b.query_x[0]).detach().requires_grad_()
    grads = {}
    for first_order in (True, False):
        order = "first_order" if first_order else "second_order"
        inner_config = InnerConfig(steps, p.inner_lr, adapt="head", order=order)
        inner = sgd_steps(p.model, p.params, Support(b.support_y[0], features=phi_s), inner_config)
        loss = cross_entropy(readout(phi_q, inner.head.weight, inner.head.bias), b.query_y[0])
        grads[first_order] = torch.autograd.grad(loss, (phi_s, phi_q), allow_unused=True, materialize_grads=True)
    (fo_support, fo_query), (so_support, so_query) = grads[True], grads[False]
    assert torch.count_nonzero(fo_support) == 0
    assert torch.count_nonzero(so_support) > 0
    assert torch.count_nonzero(fo_query) > 0
    assert torch.equal(fo_query, so_query)


@pytest.mark.parametrize("name", ["mlp", "conv4"])
@pytest.mark.parametrize("first_order", [False, True])
def test_zeroing_first_full_network_step_leaves_encoder_unchanged(make_problem, name, first_order):
    p = make_problem(name, head="zero")
    b = p.batch
    start = encoder_part(p.params)

    def step(params):
        return sgd_steps(p.model, params, Support(b.support_y[0], images=b.support_x[0]),
                         InnerConfig(1, p.inner_lr, order="first_order" if first_order else "second_order"))

    inner = step(p.params)
    assert all(torch.equal(inner.encoder[k], v) for k, v in start.items())
    assert torch.count_nonzero(inner.head.weight) > 0
    moved = step(make_problem(name, head="random").params)
    assert not all(torch.equal(moved.encoder[k], v) for k, v in start.items())


@pytest.mark.parametrize("adapt", ADAPT)
@pytest.mark.parametrize("head", ["random", "zero"])
def test_evaluate_matches_oracle_accuracies(make_problem, reference, adapt, head):
    p = make_problem("conv4", head=head, seed=1)
    b = p.batch
    steps = 3
    algo = p.algorithm(adapt=adapt)
    per_path = []
    for mode in algo.executions:
        algo = algo.with_execution(mode)
        per_path.append(algo.evaluate(p.params, b, steps))
    accs = per_path[0]
    assert all(torch.equal(a, accs) for a in per_path)
    tasks = b.support_y.shape[0]
    assert accs.shape == (tasks, steps + 1)
    assert bool(((accs >= 0) & (accs <= 1)).all())
    leaves = {k: v.clone().requires_grad_() for k, v in p.params.items()}
    expected = torch.zeros(tasks, steps + 1, dtype=accs.dtype)
    for i in range(tasks):
        for t in range(steps + 1):
            fast = reference.adapt(p.model, leaves, b.support_x[i], b.support_y[i], steps=t,
                                   lr=p.inner_lr, adapt=adapt, first_order=True)
            logits = functional_call(p.model, fast, (b.query_x[i],))
            expected[i, t] = (logits.argmax(-1) == b.query_y[i]).to(accs.dtype).mean()
    assert torch.allclose(accs, expected, rtol=0, atol=1e-12)
    if head == "zero":
        assert accs[:, 0].tolist() == pytest.approx([1 / p.ways] * tasks, abs=1e-15)


@pytest.mark.parametrize("execution", ["loop", "vmap"])
@pytest.mark.parametrize("adapt", ADAPT)
@pytest.mark.parametrize("name", ["maml", "imaml", "entropy_sgd"])
def test_decomposing_does_not_change_the_meta_gradient_bitwise(make_problem, name, adapt, execution):
    """A training run with the decomposition on follows the same trajectory as without it
    (Entropy-SGD: from the same generator state, so both steps draw the same noise)."""
    p = make_problem("conv4", dtype=torch.float32)
    algo = build_algorithm({"name": name, "adapt": adapt, "inner_lr": p.inner_lr}, p.model)
    algo = algo.with_execution(execution)
    state = algo.state_dict()
    plain = algo.meta_grad(p.params, p.batch).grad
    algo.load_state_dict(state)
    decomposed = algo.meta_grad(p.params, p.batch, decompose=True)
    assert decomposed.decomposition is not None
    assert all(torch.equal(decomposed.grad[k], plain[k]) for k in plain)
