"""The external Reptile plugin (``examples/reptile_plugin``) found through its entry point.

No pip and no network: a ``reptile_plugin-0.1.0.dist-info`` with ``entry_points.txt`` is
written into a temporary directory on ``sys.path`` next to the example's source directory,
which is what an installed distribution looks like to ``importlib.metadata``. The engine's
registry is swapped for a copy so the plugin does not leak into other tests.
"""
from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel.algorithm as engine
from bilevel import available_algorithms, build_algorithm
from bilevel.testing import rel_err, seeded_problem

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reptile_plugin"


@pytest.fixture
def reptile_installed(tmp_path, monkeypatch):
    dist = tmp_path / "reptile_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: reptile_plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[bilevel.algorithms]\nreptile = reptile_plugin:Reptile\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    yield
    sys.modules.pop("reptile_plugin", None)


def _problem(seed=0, tasks=2, ways=3, shots=2, queries=2):
    p = seeded_problem("mlp", ways=ways, shots=shots, queries=queries, tasks=tasks, shape=(6,), seed=seed)
    return p.model, p.params, p.batch


def _reptile_reference(model, params, batch, steps, lr):
    """Literal Reptile: T SGD steps on the pooled task batch, ``(θ − θ_T)/(αT)``, mean over tasks."""
    tasks = batch.support_y.shape[0]
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(tasks):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        p = dict(params)
        for _ in range(steps):
            leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            grads = torch.autograd.grad(F.cross_entropy(functional_call(model, leaves, (x,)), y), list(leaves.values()))
            p = {k: v - lr * g for (k, v), g in zip(p.items(), grads)}
        for k in out:
            out[k] += (params[k] - p[k]) / (lr * steps * tasks)
    return out


def test_entry_point_registers_reptile(reptile_installed):
    names = [ep.name for ep in entry_points(group="bilevel.algorithms")]
    assert "reptile" in names
    assert "reptile" in available_algorithms()
    model, _, _ = _problem()
    algo = build_algorithm({"name": "reptile", "inner_steps": 3, "inner_lr": 0.1}, model)
    assert type(algo).__module__ == "reptile_plugin"
    assert algo.terms == ("contrastive", "init")
    with pytest.raises(ValueError, match="unknown key"):
        build_algorithm({"name": "reptile", "gamma0": 1.0}, model)


def test_reptile_direction_and_decomposition(reptile_installed):
    model, params, batch = _problem()
    algo = build_algorithm({"name": "reptile", "inner_steps": 3, "inner_lr": 0.1}, model)
    step = algo.meta_grad(params, batch, decompose=True)
    ref = _reptile_reference(model, params, batch, 3, 0.1)
    assert rel_err(step.grad, ref) < 1e-10
    d = step.decomposition
    assert float(d.identity_error) < 1e-10
    assert float(d.reconstruction_error) < 1e-10


def test_reptile_trains(reptile_installed):
    model, params, batch = _problem(seed=1)
    algo = build_algorithm({"name": "reptile", "inner_steps": 2, "inner_lr": 0.1}, model)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = algo.make_outer_optimizer(list(params.values()), lr=0.01)
    losses = []
    for _ in range(15):
        step = algo.meta_grad(params, batch)
        for k, p in params.items():
            p.grad = step.grad[k]
        optimizer.step()
        algo.outer_step_done()
        losses.append(float(step.loss))
    assert all(torch.isfinite(p).all() for p in params.values())
    assert losses[-1] < 0.9 * losses[0]
