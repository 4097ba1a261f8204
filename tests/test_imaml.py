"""iMAML: CG, the implicit meta-gradient and its exact decomposition (docs/theory.md §5), in float64.

References are independent of the code under test: plain autograd through a long unrolled
proximal gradient descent written with ``functional_call`` on the whole model
(``nn.Linear`` head, ``F.cross_entropy``), and the dense-Hessian solve of
``theory_checks.imaml_claims`` (``torch.func.hessian`` + ``torch.linalg.solve``). Full-network problems use a tanh encoder, so the inner problem is
smooth and gradient descent reaches its stationary point (a ReLU encoder stalls on kinks).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bilevel import InnerConfig, ModelConfig, Support, Want, build_algorithm, build_model, proximal_solve
from bilevel.primitives.cg import conjugate_gradient
from bilevel.primitives.models import BilevelModel
from bilevel.data.batch import TaskBatch
from bilevel.primitives.params import is_head
from bilevel.testing import rel_err, seeded_batch
from theory_checks.imaml_claims import LinearSystem, adapted_keys, dense_implicit_gradient, inner_solution

DTYPE = torch.float64
WAYS, SHOTS, QUERIES, TASKS, INPUT = 3, 2, 2, 2, 5
LAM, LR, CONVERGED_STEPS = 4.0, 0.25, 40


class TanhEncoder(nn.Module):
    """A smooth encoder ``tanh(Linear(x))`` (the model calls ``encoder(x, layout)``)."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, hidden)

    def forward(self, x, layout=None):
        return torch.tanh(self.linear(x))


def _batch(seed: int, tasks: int = TASKS) -> TaskBatch:
    return seeded_batch(torch.Generator().manual_seed(seed), ways=WAYS, shots=SHOTS, queries=QUERIES, tasks=tasks,
                        shape=(INPUT,), permute=True)


def _model(kind: str, seed: int = 0) -> BilevelModel:
    torch.manual_seed(seed)
    if kind == "relu":
        return build_model(ModelConfig(name="mlp", hidden=8, layers=1), (INPUT,), WAYS).to(DTYPE)
    return BilevelModel(TanhEncoder(INPUT, 4), 4, WAYS).to(DTYPE)


def _imaml(model: BilevelModel, adapt: str, **kw):
    cfg = {"name": "imaml", "adapt": adapt, "lam": LAM, "inner_lr": LR, "inner_steps": CONVERGED_STEPS,
           "cg_iters": 60}
    cfg.update(kw)
    return build_algorithm(cfg, model)


def _logits(model, params, x):
    return functional_call(model, params, (x,))


# ----------------------------------------------------------------------------- references
def _unrolled_reference(model, params, batch, adapt: str, steps: int = 50) -> dict:
    """Mean over tasks of d L_Q(φ_T(p)) / dp through ``steps`` unrolled proximal GD steps."""
    keys = adapted_keys(params, adapt)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(batch.support_y.shape[0]):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        phi = {k: p[k] for k in keys}
        for _ in range(steps):
            loss_s = F.cross_entropy(_logits(model, {**p, **phi}, batch.support_x[i]), batch.support_y[i])
            grads = torch.autograd.grad(loss_s, list(phi.values()), create_graph=True)
            phi = {k: v - LR * (g + LAM * (v - p[k])) for (k, v), g in zip(phi.items(), grads)}
        loss_q = F.cross_entropy(_logits(model, {**p, **phi}, batch.query_x[i]), batch.query_y[i])
        for k, g in zip(p, torch.autograd.grad(loss_q, list(p.values()))):
            total[k] = total[k] + g / batch.support_y.shape[0]
    return total


def _inner_solution(model, params, xs, ys, adapt: str, steps: int = CONVERGED_STEPS) -> dict:
    return inner_solution(model, params, xs, ys, adapt, lam=LAM, lr=LR, steps=steps)


def _dense_reference(model, params, batch, adapt: str, **damped) -> dict:
    return dense_implicit_gradient(model, params, batch, adapt, lam=LAM, lr=LR, steps=CONVERGED_STEPS, system=LinearSystem(**damped))


# ---------------------------------------------------------------------------------------- CG
def test_cg_solves_scalar_and_one_element_problems():
    for rhs in (torch.tensor(6.0, dtype=DTYPE), torch.tensor([6.0], dtype=DTYPE)):
        result = conjugate_gradient(lambda v: {"x": 3.0 * v["x"]}, {"x": rhs}, iters=3)
        assert torch.allclose(result.solution["x"], torch.full_like(rhs, 2.0), atol=1e-14)
        assert result.residual_norms.shape == (4,)
        assert float(result.residual_norms[0]) == 6.0 and float(result.residual_norms[-1]) == 0.0


def test_cg_matches_dense_solve_under_vmap_and_zero_rhs_is_finite():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(7, 7, generator=gen, dtype=DTYPE)
    a = m @ m.T + 0.5 * torch.eye(7, dtype=DTYPE)
    rhs = torch.randn(3, 7, generator=gen, dtype=DTYPE)
    rhs[1] = 0.0
    solve = lambda b: conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, iters=30).solution["x"]  # noqa: E731
    got = torch.vmap(solve)(rhs)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.linalg.solve(a, rhs.T).T, atol=1e-10)
    frozen = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": rhs[0]}, iters=30, tol=1e-3)
    assert float(frozen.residual_norms[-1]) <= 1e-3 and float(frozen.residual_norms[-1]) > 0


# ------------------------------------------------------------------------ implicit meta-gradient
@pytest.mark.slow
@pytest.mark.parametrize("adapt,kind", [("head", "relu"), ("all", "tanh")])
def test_implicit_gradient_equals_derivative_of_converged_unrolled_solve(adapt, kind):
    model = _model(kind)
    params, batch = model.init_params(), _batch(1)
    step = _imaml(model, adapt).meta_grad(params, batch)
    assert rel_err(step.grad, _unrolled_reference(model, params, batch, adapt)) < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("adapt,kind", [("head", "relu"), ("all", "tanh")])
def test_cg_gradient_matches_dense_solve_and_error_falls_with_iterations(adapt, kind):
    model = _model(kind)
    params, batch = model.init_params(), _batch(2)
    dense = _dense_reference(model, params, batch, adapt)
    errors = [rel_err(_imaml(model, adapt, cg_iters=k).meta_grad(params, batch).grad, dense) for k in (1, 2, 4, 8, 60)]
    assert errors[-1] < 1e-8, errors
    assert all(b <= 1.05 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[3] < 0.1 * errors[0], errors


def test_damped_variant_solves_the_authors_system():
    model = _model("relu")
    params, batch = model.init_params(), _batch(3)
    dense = _dense_reference(model, params, batch, "head", damping=0.5, lam_offset=10.0)
    step = _imaml(model, "head", damping=0.5, lam_offset=10.0).meta_grad(params, batch)
    assert rel_err(step.grad, dense) < 1e-8


def test_stationarity_residual_falls_with_inner_steps():
    model = _model("relu")
    params, batch = model.init_params(), _batch(4)
    res = [float(_imaml(model, "head", inner_steps=t).meta_grad(params, batch).extras["imaml/stationarity"])
           for t in (1, 2, 4, 8, CONVERGED_STEPS)]
    assert all(b < a for a, b in zip(res[:4], res[1:4])), res
    assert res[-1] < 1e-10, res


# ----------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("adapt,kind", [("head", "relu"), ("all", "relu"), ("all", "tanh")])
@pytest.mark.parametrize("inner_steps", [3, CONVERGED_STEPS])
def test_decomposition_identity_and_reconstruction(adapt, kind, inner_steps):
    model = _model(kind)
    params, batch = model.init_params(), _batch(5)
    cg_iters = 40 if adapt == "head" else 120
    step = _imaml(model, adapt, inner_steps=inner_steps, cg_iters=cg_iters).meta_grad(params, batch, decompose=True)
    d = step.decomposition
    assert set(d.terms) == {"contrastive", "init", "coefficient", "solver_residual", "solve_error"}
    assert float(d.identity_error) < 1e-10
    assert float(d.reconstruction_error) < 1e-10
    enc = [k for k in params if not is_head(k)]
    residual = max(float(d.terms["solver_residual"][k].abs().max()) for k in enc)
    if inner_steps == CONVERGED_STEPS and kind != "relu":
        assert residual < 1e-10
    if inner_steps == 3:
        assert residual > 1e-6
    assert all(torch.isfinite(v).all() for v in step.extras.values())


def test_head_only_coefficient_term_is_the_implicit_jacobian_path():
    """Head-only, converged: contrastive + coefficient = the encoder gradient minus the query-side
    direct term ``∂_θ L_Q`` at fixed W*; init + residual (+ query-side contrastive) = ``∂_θ L_Q``."""
    model = _model("relu")
    params, batch = model.init_params(), _batch(6)
    d = _imaml(model, "head", cg_iters=40).meta_grad(params, batch, decompose=True).decomposition
    enc = [k for k in params if not is_head(k)]
    direct = {k: torch.zeros_like(params[k]) for k in enc}
    for i in range(TASKS):
        phi = _inner_solution(model, params, batch.support_x[i], batch.support_y[i], "head")
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss_q = F.cross_entropy(_logits(model, {**p, **phi}, batch.query_x[i]), batch.query_y[i])
        for k, g in zip(enc, torch.autograd.grad(loss_q, [p[k] for k in enc])):
            direct[k] = direct[k] + g / TASKS
    implicit_path = {k: d.total[k] - direct[k] for k in enc}
    assert rel_err(implicit_path, direct) > 1e-6
    sides = build_algorithm({"name": "imaml", "adapt": "head", "lam": LAM, "inner_lr": LR,
                             "inner_steps": CONVERGED_STEPS, "cg_iters": 40}, model)
    sides_terms = ("contrastive_query", "contrastive_support", "init", "coefficient", "solver_residual", "solve_error")
    t = sides.meta_step(params, batch, Want(terms=sides_terms)).decomposition.terms
    support_path = {k: t["contrastive_support"][k] + t["coefficient"][k] for k in enc}
    query_path = {k: t["contrastive_query"][k] + t["init"][k] + t["solver_residual"][k] for k in enc}
    assert rel_err(support_path, implicit_path) < 1e-9
    assert rel_err(query_path, direct) < 1e-9


@pytest.mark.parametrize("adapt,kind", [("head", "relu"), ("all", "tanh")])
@pytest.mark.parametrize("cg_iters", [1, 2, 5])
@pytest.mark.parametrize("system", [{}, {"damping": 0.1, "lam_offset": 1.0}])
def test_identity_is_exact_at_any_cg_budget(adapt, kind, cg_iters, system):
    """Truncated CG is not linear in its right-hand side; the terms are mapped by the plain run's
    fixed CG polynomial and ``solve_error`` holds what the solver leaves out, so the terms sum to
    the truncated (or damped) meta-gradient to round-off — and that gradient is CG's own."""
    model = _model(kind)
    params, batch = model.init_params(), _batch(5)
    algo = _imaml(model, adapt, inner_steps=3, cg_iters=cg_iters, **system)
    step = algo.meta_grad(params, batch, decompose=True)
    assert float(step.decomposition.identity_error) < 1e-10
    assert torch.equal(torch.cat([v.flatten() for v in step.grad.values()]),
                       torch.cat([v.flatten() for v in algo.meta_grad(params, batch).grad.values()]))
    if cg_iters > 1:
        return
    error = max(float(v.abs().max()) for v in step.decomposition.terms["solve_error"].values())
    converged = _imaml(model, adapt, inner_steps=3, cg_iters=120, **system).meta_grad(params, batch, decompose=True)
    converged_error = max(float(v.abs().max()) for v in converged.decomposition.terms["solve_error"].values())
    if system:
        assert converged_error > 1e-6  # the damped system is not the implicit derivative: its error stays
    else:
        assert error > 1e-6 and converged_error < 1e-9  # truncation error, gone once CG has converged


def test_identity_at_the_default_budget_in_float32_at_real_size(single_thread):
    """The default iMAML (head, 10 solver steps, 5 CG iterations) on conv4 with 64 channels on
    28×28 images, 5-way 1-shot 15 queries, in float32: identity ≤ 1e-5."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="conv4", channels=64), (1, 28, 28), 5)
    params = model.init_params()
    gen = torch.Generator().manual_seed(0)
    batch = seeded_batch(gen, ways=5, shots=1, queries=15, tasks=2, shape=(1, 28, 28), dtype=torch.float32)
    d = build_algorithm({"name": "imaml"}, model).meta_grad(params, batch, decompose=True).decomposition
    assert float(d.identity_error) < 1e-5


TRAINED = Path(__file__).parent / "data" / "imaml_trained_conv4.pt"
"""The parameters of a default ``bilevel-train algorithm=imaml`` run after its 400 steps (conv4, 64
channels, glyphs 5-way 1-shot): features and predictions as training leaves them, where the float32
split used to fail (identity 5.1e-4 – 1.6e-3 on these batches before the solve ran in float64)."""


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_identity_in_float32_on_trained_parameters(single_thread, execution):
    """Trained features make ``‖H‖/λ`` large and the terms' pieces cancel: the default iMAML's
    float32 identity stays ≤ 1e-5 there too (docs/theory.md §5, *Precision*)."""
    model = build_model(ModelConfig(name="conv4", channels=64), (1, 28, 28), 5)
    params = torch.load(TRAINED)
    algorithm = build_algorithm({"name": "imaml"}, model, execution=execution)
    for seed in range(3):
        batch = seeded_batch(torch.Generator().manual_seed(seed), ways=5, shots=1, queries=15, tasks=2,
                             shape=(1, 28, 28), dtype=torch.float32)
        d = algorithm.meta_grad(params, batch, decompose=True).decomposition
        assert float(d.identity_error) < 1e-5, f"batch {seed}"


def test_conv_bias_before_batchnorm_gets_a_round_off_gradient(single_thread):
    """A conv bias followed by BatchNorm is cancelled by it: its exact gradient is 0. In float32
    what it gets is round-off, ≤ 2e-7 of the meta-gradient's norm on trained parameters (a fused
    bias's oneDNN gradient left 1.4e-6 – 3.1e-6 on these batches)."""
    model = build_model(ModelConfig(name="conv4", channels=64), (1, 28, 28), 5)
    params = torch.load(TRAINED)
    algorithm = build_algorithm({"name": "imaml"}, model, execution="loop")
    for seed in range(3):
        batch = seeded_batch(torch.Generator().manual_seed(seed), ways=5, shots=1, queries=15, tasks=2,
                             shape=(1, 28, 28), dtype=torch.float32)
        grad = algorithm.meta_grad(params, batch).grad
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in grad.values()))
        bias = max(float(v.norm()) for k, v in grad.items() if k.endswith("conv.bias"))
        assert bias <= 2e-7 * norm, f"batch {seed}: {bias / norm:.1e}"


# ----------------------------------------------------------------------------- paths, config
@pytest.mark.parametrize("adapt", ["head", "all"])
def test_vmap_equals_loop(adapt):
    model = _model("relu")
    params, batch = model.init_params(), _batch(7)
    algo = _imaml(model, adapt, inner_steps=5, cg_iters=5)
    out = {}
    for mode in ("vmap", "loop"):
        algo = algo.with_execution(mode)
        out[mode] = algo.meta_grad(params, batch, decompose=True)
    assert rel_err(out["vmap"].grad, out["loop"].grad) < 1e-12
    scale = math.sqrt(sum(float((v ** 2).sum()) for v in out["loop"].grad.values()))
    for term in algo.terms:  # relative to the meta-gradient: solve_error is itself ~1e-9 of it here
        v, l = out["vmap"].decomposition.terms[term], out["loop"].decomposition.terms[term]
        assert math.sqrt(sum(float(((v[k] - l[k]) ** 2).sum()) for k in l)) / scale < 1e-12
    for key, value in out["loop"].extras.items():
        assert value.dim() == 0 and torch.allclose(out["vmap"].extras[key], value, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("adapt", ["head", "all"])
def test_evaluate_reports_accuracy_after_each_proximal_step(adapt):
    model = _model("relu")
    params, batch = model.init_params(), _batch(8)
    algo = _imaml(model, adapt, inner_steps=3)
    accs = algo.evaluate(params, batch, steps=3)
    assert accs.shape == (TASKS, 4)
    expected = []
    for t in range(4):
        per_task = []
        for i in range(TASKS):
            phi = _inner_solution(model, params, batch.support_x[i], batch.support_y[i], adapt, steps=t)
            logits = _logits(model, {**params, **phi}, batch.query_x[i])
            per_task.append((logits.argmax(-1) == batch.query_y[i]).to(DTYPE).mean())
        expected.append(torch.stack(per_task))
    assert torch.allclose(accs, torch.stack(expected, dim=-1))


@pytest.mark.parametrize("bad", [{"lam": 0.0}, {"lam": -1.0}, {"cg_iters": 0}, {"adapt": "encoder"},
                                 {"inner_steps": 0}, {"inner_lr": 0.0}, {"damping": -0.1}])
def test_bad_config_is_a_clear_error(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        build_algorithm({"name": "imaml", **bad}, _model("relu"))


def test_proximal_solve_records_a_head_trace():
    model = _model("relu")
    params, batch = model.init_params(), _batch(9)
    result = proximal_solve(model, params, Support(batch.support_y[0], images=batch.support_x[0]),
                            InnerConfig(steps=4, lr=LR, adapt="head"), LAM)
    assert len(result.head.trace.coeffs) == 4
    rebuilt = result.head.trace.weight0 + sum(a.T @ f for a, f in zip(result.head.trace.coeffs,
                                                                   result.head.trace.features))
    assert torch.allclose(rebuilt, result.head.weight, atol=1e-12)
