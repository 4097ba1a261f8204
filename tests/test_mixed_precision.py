"""Mixed precision (``precision=bf16|fp16``): accuracy against float64, the decomposition's identity,
the fp16 loss scale, and the float32 engine left bit for bit as it was.

The accuracy cell is the default run's: second-order MAML, 2 inner steps at 0.4, adapt all, conv4 at
the real size on glyph tasks (5-way 1-shot, 15 queries), zero head (``head.policy=zeroing``); the
error is the median over 8 tasks of ``‖g − g64‖ / ‖g64‖`` against the float64 engine.
"""
from __future__ import annotations

import copy
import logging
import statistics

import pytest
import torch

from bilevel import ModelConfig, build_algorithm, build_model
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app import loss_scale
from bilevel.app.loss_scale import DynamicLossScale
from bilevel.report.runs import load_scalars
from bilevel.app.train import train
from bilevel.data import build_sampler
from bilevel.data.config import DataConfig
from bilevel.errors import ConfigError
from bilevel.primitives import models
from bilevel.primitives import precision
from bilevel.primitives.precision import ERROR_BOUND, Policy, mixed_precision, precision_warning
from bilevel import tags
from test_train import config

MAML_DEFAULT = {"name": "maml", "inner_steps": 2, "inner_lr": 0.4}
TASKS = 8


@pytest.fixture(scope="module")
def glyph_cell():
    """The float32 model, zero-head parameters, 8 glyph tasks and their float64 meta-gradients."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), (1, 28, 28), 5)
    params = model.init_params()
    params["head.weight"].zero_()
    params["head.bias"].zero_()
    batch = build_sampler(DataConfig(queries=15), "train", TASKS, seed=0).sample()
    model64 = copy.deepcopy(model).double()
    params64 = {k: v.double() for k, v in params.items()}
    algo64 = build_algorithm(MAML_DEFAULT, model64, "vmap")
    tasks = [batch.task(i) for i in range(TASKS)]
    exact = [algo64.meta_grad(params64, t.to(dtype=torch.float64)).grad for t in tasks]
    return model, params, tasks, exact


def median_error(algo, params, tasks, exact, rel_err, policy) -> float:
    with mixed_precision(policy):
        grads = [algo.meta_grad(params, t).grad for t in tasks]
    return statistics.median(rel_err({k: v.double() for k, v in g.items()}, e) for g, e in zip(grads, exact))


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_bf16_maml_meta_gradient_is_within_the_bound(single_thread, rel_err, glyph_cell, path):
    model, params, tasks, exact = glyph_cell
    algo = build_algorithm(MAML_DEFAULT, model, path)
    error = median_error(algo, params, tasks, exact, rel_err, "bf16")
    assert error <= ERROR_BOUND, f"bf16 {path}: {error:.2e}"
    assert error > 1e-4, "bf16 derivative kernels were not used"


def test_bf16_forward_values_exceed_the_bound(single_thread, rel_err, glyph_cell):
    """Why the values stay float32: 16-bit convolutions in the forward too (autocast-like) are far off."""
    model, params, tasks, exact = glyph_cell
    algo = build_algorithm(MAML_DEFAULT, model, "loop")
    error = median_error(algo, params, tasks[:3], exact[:3], rel_err, Policy("bf16", forward16=True))
    assert error > 5 * ERROR_BOUND, f"{error:.2e}"


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_bf16_decomposition_identity_holds(single_thread, glyph_cell, path):
    model, params, tasks, _ = glyph_cell
    algo = build_algorithm(MAML_DEFAULT, model, path)
    with mixed_precision("bf16"):
        step = algo.meta_grad(params, tasks[0], decompose=True)
    assert float(step.decomposition.identity_error) <= 1e-2
    assert all(v.dtype == torch.float32 for term in step.decomposition.terms.values() for v in term.values())


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_fp32_is_bit_identical_to_the_engine_without_the_hook(make_problem, monkeypatch, path):
    """``precision=fp32`` (no policy) and the model's hook compute exactly what plain ops compute."""
    p = make_problem("conv4", dtype=torch.float32, ways=3, queries=2, tasks=2, channels=4)
    algo = build_algorithm(MAML_DEFAULT, p.model, path)
    with mixed_precision("fp32"):
        hooked = algo.meta_grad(p.params, p.batch, decompose=True)
    monkeypatch.setattr(models, "mixed_op", lambda op, *inputs: op(*inputs))
    plain = algo.meta_grad(p.params, p.batch, decompose=True)
    assert all(torch.equal(hooked.grad[k], plain.grad[k]) for k in plain.grad)
    for term, rows in plain.decomposition.terms.items():
        assert all(torch.equal(hooked.decomposition.terms[term][k], v) for k, v in rows.items())


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_fp16_on_the_cpu_is_finite_and_scaling_is_exact(single_thread, make_problem, rel_err, path):
    """CPU fp16 kernels exist (slowly): a small conv4's second-order meta-gradient is finite, within
    the bound, and the loss scale (a real multiplication) changes it only by round-off."""
    p = make_problem("conv4", dtype=torch.float32, ways=5, queries=5, tasks=2, channels=8, head="zero")
    exact = build_algorithm(MAML_DEFAULT, copy.deepcopy(p.model).double()).meta_grad(
        {k: v.double() for k, v in p.params.items()}, p.batch.to(dtype=torch.float64)).grad
    algo = build_algorithm(MAML_DEFAULT, p.model, path)
    grads = {}
    for s in (1.0, 128.0):
        with mixed_precision("fp16", DynamicLossScale(scale=s)):
            grads[s] = algo.meta_grad(p.params, p.batch).grad
        assert all(torch.isfinite(g).all() for g in grads[s].values())
        assert rel_err({k: v.double() for k, v in grads[s].items()}, exact) <= ERROR_BOUND
    assert rel_err(grads[128.0], grads[1.0]) <= 1e-2


def test_fp16_overflow_is_skipped_counted_and_shrinks_the_scale(make_problem):
    p = make_problem("conv4", dtype=torch.float32, ways=3, queries=2, tasks=2, channels=4)
    algo = build_algorithm(MAML_DEFAULT, p.model, "loop")
    scaler = DynamicLossScale(scale=2.0 ** 60)
    with mixed_precision("fp16", scaler):
        step = algo.meta_grad(p.params, p.batch)
    assert not scaler.accept(1, step.grad, step.loss)
    assert (scaler.skipped, scaler.scale) == (1, 2.0 ** 59)


def test_fp16_training_skips_overflowing_steps_and_logs_them(tmp_path, monkeypatch, caplog):
    """A run whose loss scale overflows: the steps are skipped, counted in the checkpoint and in
    TensorBoard, said on the console, and the parameters stay finite."""
    monkeypatch.setattr(loss_scale, "INITIAL_SCALE", 2.0 ** 60)
    with caplog.at_level(logging.WARNING):
        train(config("precision=fp16"), tmp_path, show_progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))
    skipped = state["loss_scale"]["skipped"]
    assert skipped >= 1 and state["loss_scale"]["scale"] < 2.0 ** 60
    assert all(torch.isfinite(v).all() for v in state["params"].values())
    assert "fp16 overflow" in caplog.text
    logged = load_scalars(tmp_path)
    assert logged[tags.TRAIN_SKIPPED_STEPS][1][-1] == skipped


@pytest.mark.parametrize("overrides, words", [
    (["precision=fp8"], "precision"),
    (["precision=bf16", "dtype=float64"], "dtype=float32"),
])
def test_bad_precision_is_refused_before_any_work(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        train(config(*overrides), tmp_path, show_progress=False)


def test_a_run_is_told_when_its_error_exceeds_the_bound(monkeypatch):
    monkeypatch.setattr(precision, "MEASURED_ERROR", {"bf16": {"a": ERROR_BOUND / 2, "b": ERROR_BOUND * 2}})
    assert "within" in precision_warning("bf16", "a")
    assert "ABOVE" in precision_warning("bf16", "b") and f"{ERROR_BOUND * 2:.1e}" in precision_warning("bf16", "b")
    assert "not measured" in precision_warning("bf16", "plugin")
    assert precision_warning("fp32", "b") is None
    assert "slower" in precision_warning("fp16", "a", torch.device("cpu"))
