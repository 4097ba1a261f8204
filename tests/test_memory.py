"""``memory=recompute[:K]`` computes what ``memory=store`` computes (float64, tiny problems).

The stored backward (one VJP of the whole inner loop) is the reference; the recomputed one
re-runs the inner steps segment by segment in the backward (``bilevel.hypergrad.recompute``).
Every row a meta-step returns — the plain meta-gradient, every decomposition term, the
adaptation diagnostic and the ablated gradient — must agree to 1e-12 relative, on each path.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hydra import compose, initialize_config_module

from algorithms.meta_sgd import MetaSGD
import bilevel.algorithm as engine
from bilevel import build_algorithm
from bilevel.algorithm import algorithm_config, register
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app.config.schema import register_configs, typed_config
from bilevel.app.train import train
from bilevel.errors import ConfigError
from bilevel.execution.memory import estimate_bytes
from bilevel.validate import parse_memory
from bilevel.primitives.models import build_model
from bilevel.testing import rel_err, seeded_problem

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-12


def rows(algo, params, batch) -> dict:
    """Every row of a meta-step: plain, decomposed (terms, adaptation) and ablated."""
    state = algo.state_dict()
    plain = algo.meta_grad(params, batch).grad
    algo.load_state_dict(state)
    step = algo.meta_grad(params, batch, decompose=True)
    algo.load_state_dict(state)
    ablated = algo.ablated_meta_grad(params, batch, keep=("contrastive",)).grad
    algo.load_state_dict(state)
    out = {"plain": plain, "decomposing step's grad": step.grad, "ablated": ablated}
    out.update({f"term {t}": v for t, v in step.decomposition.terms.items()})
    if step.decomposition.encoder_adaptation is not None:
        out["adaptation"] = step.decomposition.encoder_adaptation
    return out


def assert_same_rows(algo, params, batch, memory: str) -> None:
    stored = rows(algo, params, batch)
    recomputed = rows(algo.with_memory(memory), params, batch)
    errors = {name: rel_err(recomputed[name], ref) for name, ref in stored.items()}
    assert max(errors.values()) <= TOL, errors
    assert any(float(v.abs().sum()) > 0 for v in stored["term contrastive"].values())


@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("steps", [1, 5, 10])
def test_maml_recompute_equals_store(order, adapt, steps):
    p = seeded_problem("mlp", tasks=2, shots=2)
    algo = p.algorithm(order=order, adapt=adapt, inner_steps=steps)
    for path in algo.executions:
        assert_same_rows(algo.with_execution(path), p.params, p.batch, "recompute")


@pytest.mark.parametrize("memory", ["recompute:3", "recompute:9"])
def test_segments_equal_store_with_batchnorm(memory):
    """conv4 (per-task set BatchNorm statistics): segments of K steps, K not dividing T, K > T."""
    p = seeded_problem("conv4", tasks=2, channels=3)
    algo = p.algorithm(inner_steps=4)
    for path in algo.executions:
        assert_same_rows(algo.with_execution(path), p.params, p.batch, memory)


@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_meta_sgd_recompute_equals_store(order, monkeypatch):
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("meta_sgd")(MetaSGD)
    p = seeded_problem("mlp", tasks=2, shots=2)
    algo = MetaSGD(p.model, algorithm_config({"name": "meta_sgd", "inner_steps": 5, "order": order}))
    params = algo.meta_parameters(p.params)
    params = {k: v * (1 + 0.1 * torch.rand_like(v)) if k.startswith("meta_sgd") else v for k, v in params.items()}
    for path in algo.executions:
        assert_same_rows(algo.with_execution(path), params, p.batch, "recompute")


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_entropy_sgd_recompute_equals_store(adapt):
    p = seeded_problem("mlp", tasks=2, shots=2, permute=True)
    algo = build_algorithm({"name": "entropy_sgd", "inner_steps": 4, "inner_lr": 0.1, "noise": 0.05,
                            "adapt": adapt, "seed": 3}, p.model)
    for path in algo.executions:
        assert_same_rows(algo.with_execution(path), p.params, p.batch, "recompute")


def test_refusals_are_clear():
    p = seeded_problem("mlp")
    with pytest.raises(ConfigError, match="inner_momentum=0"):
        p.algorithm(inner_momentum=0.5).with_memory("recompute")
    with pytest.raises(ConfigError, match="available: store"):
        build_algorithm({"name": "imaml"}, p.model).with_memory("recompute")
    with pytest.raises(ConfigError, match="recompute:K with an integer K >= 1"):
        p.algorithm().with_memory("recompute:0")
    assert [parse_memory(m) for m in ("store", "recompute", "recompute:4")] == [None, 1, 4]


# --- the memory budget chooses among the ways to run (bilevel.execution.memory) -------------------------

TWENTY_STEPS = ["data=synthetic", "model=mlp", "model.hidden=32", "data.ways=3", "data.shots=5", "data.queries=2",
                "data.synthetic_dim=16", "data.synthetic_classes=8", "train.meta_batch=2", "train.steps=2",
                "train.eval_every=2", "train.decompose_every=1", "train.image_every=0", "eval.tasks=2",
                "eval.final_tasks=2", "device=cpu", "algorithm=maml", "algorithm.inner_steps=20", "execution=loop"]


def composed(*overrides: str):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=TWENTY_STEPS + list(overrides))


def test_a_twenty_step_run_fits_a_budget_where_store_is_refused(tmp_path, monkeypatch, caplog):
    """The budget lies between the two estimates: ``store`` is refused before any work, naming
    the numbers and the way out; ``auto`` picks ``recompute``, says so, records it and trains
    (decomposing at every step)."""
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO)
    cfg = typed_config(composed())
    shape = (cfg.data.synthetic_dim,)
    model = build_model(cfg.model, shape, cfg.data.ways)
    algorithm = build_algorithm(cfg.algorithm, model)
    store, recompute = (estimate_bytes(model, shape, cfg, algorithm, "loop", m, torch.float32, 2)
                        for m in ("store", "recompute"))
    assert 3 * recompute < store
    budget = f"train.memory_gb={(store * recompute) ** 0.5 / 2**30:.9f}"
    with pytest.raises(ConfigError, match=r"execution=loop memory=store: .*but the budget is .*memory=recompute"):
        train(composed(budget), tmp_path / "store", show_progress=False)
    assert not (tmp_path / "store").exists()
    train(composed(budget, "memory=auto"), tmp_path / "auto", show_progress=False)
    state = load_checkpoint(tmp_path / "auto" / "checkpoint.pt")
    assert (state["memory"], state["step"]) == ("recompute", 2)
    assert "memory: recompute" in (tmp_path / "auto" / "config.yaml").read_text()
    assert "re-runs the inner steps a segment at a time instead of holding them (memory=recompute)" in caplog.text
