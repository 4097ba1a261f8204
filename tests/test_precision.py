"""Float32 accuracy of every execution path, at the real model size.

conv4 with 64 channels on 1×28×28 Gaussian images, 5-way, 15 queries per class. Each task's
float32 meta-gradient is compared with the same task computed in float64 (model, parameters and
images cast up); the error of a path is the median over tasks of ``‖g − g64‖ / ‖g64‖``. The median,
because float32 error is round-off (~1e-6) plus discrete events — a max-pool or ReLU decision that
a 1e-7 perturbation flips, 1e-4 – 1e-1 on that task — which strike every implementation at random
points (``docs/performance.md``). Nine tasks for MAML's cells, because its multi-step cells put
every implementation's per-task error anywhere in 1e-6 – 3e-5 (the first conv's weight gradient, a
sum that cancels): over three tasks the ratio of two medians is a coin toss, over nine it is within
1.3× on two seeds.

* ``test_every_default_is_accurate_in_float32``: every algorithm and example plugin (:data:`DEFAULTS`, one line each)
  at its own default configuration, on every path, eight tasks. *Decision-matched*: with the
  float64 run's max-pool and ReLU decisions imposed (:func:`bilevel.testing.conv_decisions`), the
  float32 error is round-off alone: median ≤ 1e-4 and no task above 1e-3 (a task whose raw error
  is ≤ 1e-5 is not replayed: it already meets both). *Raw*: median ≤ 1e-4,
  or, where an independent plain-autograd computation exists, at most twice its median (a chain
  over the pooled batch meets discrete events on most tasks, in every implementation).
* MAML's cells: every path within 2× an independent plain-autograd loop
  (``bilevel.testing.reference_meta_grad``) and ≤ 1e-4 on one-step cells.

``BILEVEL_TEST_DEVICE=cuda`` runs the same checks on a GPU (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from test_meta_sgd import literal_meta_grad
from test_r2d2 import primal_meta_grad

import bilevel.algorithm as engine
from bilevel import ModelConfig, build_algorithm, build_model
from bilevel.algorithm import register
from bilevel.testing import (
    NoiselessChain, conv_decisions, default_config, float32_errors, labelled_batch, reference_chain_direction,
    reference_meta_grad, rel_err, seeded_problem,
)

WAYS, QUERIES, SHAPE, TASKS, MAML_TASKS, DEFAULT_TASKS = 5, 15, (1, 28, 28), 3, 9, 8
BOUND, TASK_BOUND = 1e-4, 1e-3
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_PLUGINS = EXAMPLES / "reptile_plugin"
DEVICE = torch.device(os.environ.get("BILEVEL_TEST_DEVICE", "cpu"))


def real_size(shots: int, head: str, seed: int = 0, tasks: int = TASKS):
    """The float32 conv4 model, its parameters and a batch of ``tasks`` tasks."""
    p = seeded_problem("conv4", dtype=torch.float32, ways=WAYS, shots=shots, queries=QUERIES, tasks=tasks,
                       shape=SHAPE, channels=None, head=head, seed=seed, device=DEVICE)
    return p.model, p.params, p.batch


def tasks64(model, params, batch):
    """Per task: the float32 task and its float64 copy, with the float64 model and parameters."""
    model64 = copy.deepcopy(model).to(torch.float64)
    params64 = {k: v.to(torch.float64) for k, v in params.items()}
    tasks = [batch.task(i) for i in range(batch.support_y.shape[0])]
    return model64, params64, [(task, task.to(dtype=torch.float64)) for task in tasks]


def median_error(grad_of, exact, rel_err) -> float:
    """Median over tasks of the relative error of ``grad_of(task)`` against ``exact[i]``."""
    return statistics.median(rel_err({k: v.double() for k, v in grad_of(t).items()}, e) for t, e in exact)


def error64(grad, exact) -> float:
    """``‖g − g64‖ / ‖g64‖`` of a float32 gradient dict against its float64 counterpart."""
    return rel_err({k: v.double() for k, v in grad.items()}, exact)


def unrolled_reference(algo, model, params, task):
    c = algo.config
    return reference_meta_grad(model, params, task, steps=c.inner_steps, lr=c.inner_lr, adapt=c.adapt,
                               first_order=c.order == "first_order")


def chain_reference(algo, model, params, task):
    spec = algo.spec()
    assert spec.adapt == "all" and algo.config.batches == "pooled" and not spec.noise, "the reference chain's case"
    x, y = torch.cat([task.support_x[0], task.query_x[0]]), torch.cat([task.support_y[0], task.query_y[0]])
    chain = NoiselessChain(steps=spec.steps, lr=spec.lr, gamma=spec.gamma, ema=spec.ema, scale=spec.scale)
    return reference_chain_direction(model, params, x, y, chain)


def meta_sgd_reference(algo, model, params, task):
    c = algo.config
    return literal_meta_grad(model, params, task, steps=c.inner_steps, first_order=c.order == "first_order")


def r2d2_reference(algo, model, params, task):
    c = algo.config
    grad = primal_meta_grad(model, params, task, lam=c.lam, scale=c.scale, first_order=c.order == "first_order")
    return {k: grad.get(k, torch.zeros_like(v)) for k, v in params.items()}  # R2-D2's meta head gets none


DEFAULTS = [  # one line per algorithm: a preset of configs/algorithm/ or a plugin; overrides; independent reference
    ("maml", {}, unrolled_reference),
    ("fomaml", {}, unrolled_reference),
    ("anil", {}, unrolled_reference),
    ("imaml", {}, None),
    ("entropy_sgd", {"noise": 0.0}, chain_reference),  # float32 and float64 would draw different noise
    ("r2d2", {}, r2d2_reference),
    ("meta_sgd", {}, meta_sgd_reference),
    ("reptile", {}, chain_reference),
    ("boil", {}, None),
    ("protomaml", {}, None),
]


@pytest.fixture
def example_plugins(monkeypatch):
    """The example plugins (Reptile, BOIL, ProtoMAML) registered, on a copy of the registry (not installed here)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGINS))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    import boil
    import protomaml
    import reptile_plugin

    register("reptile")(reptile_plugin.Reptile)
    register("boil")(boil.BOIL)
    register("protomaml")(protomaml.ProtoMAML)
    yield
    for module in ("reptile_plugin", "boil", "protomaml"):
        sys.modules.pop(module, None)


@pytest.mark.parametrize("name, overrides, reference", DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_every_default_is_accurate_in_float32(single_thread, example_plugins, name, overrides, reference):
    model, net, batch = real_size(1, "random", tasks=DEFAULT_TASKS)
    algo = build_algorithm({**default_config(name), **overrides}, model)
    params = algo.meta_parameters(net)
    tasks = [batch.task(i) for i in range(DEFAULT_TASKS)]
    errors, exact = float32_errors(algo, params, tasks, replay_above=BOUND / 10)
    independent = None
    for path, (raw, matched) in errors.items():
        assert statistics.median(matched) <= BOUND and max(matched) <= TASK_BOUND, (path, matched)
        if statistics.median(raw) > BOUND:  # events on most tasks: does an independent implementation meet them too?
            assert reference is not None, (path, raw)
            independent = independent or [error64(reference(algo, model, params, t), e) for t, e in zip(tasks, exact)]
            assert statistics.median(raw) <= 2 * statistics.median(independent), (path, raw, independent)


@pytest.mark.parametrize("name, overrides, reference", [d for d in DEFAULTS if d[2] is not None],
                         ids=[d[0] for d in DEFAULTS if d[2] is not None])
def test_the_independent_references_compute_the_defaults(example_plugins, name, overrides, reference):
    """Each reference above, in float64 on a small conv4 (4 channels, 16×16), equals the engine at the
    algorithm's defaults: the raw comparison measures two implementations of one map."""
    p = seeded_problem("conv4", ways=WAYS, shots=1, queries=2, tasks=1, seed=3)
    algo = build_algorithm({**default_config(name), **overrides}, p.model)
    params = algo.meta_parameters(p.params)
    assert rel_err(reference(algo, p.model, params, p.batch), algo.meta_grad(params, p.batch).grad) < 1e-10


MAML_CELLS = [  # shots, inner steps, order, adapted set, head
    (1, 1, "second_order", "all", "random"),
    (1, 1, "first_order", "all", "zero"),
    (1, 1, "second_order", "head", "zero"),
    (1, 1, "first_order", "head", "random"),
    (5, 1, "second_order", "all", "zero"),
    (1, 5, "first_order", "all", "random"),
]


@pytest.mark.parametrize("shots, steps, order, adapt, head", MAML_CELLS)
def test_maml_paths_are_as_accurate_as_a_plain_autograd_loop(single_thread, rel_err, shots, steps, order, adapt, head):
    model, params, batch = real_size(shots, head, tasks=MAML_TASKS)
    model64, params64, tasks = tasks64(model, params, batch)
    options = dict(steps=steps, lr=0.4, adapt=adapt, first_order=order == "first_order")
    exact = [(t, reference_meta_grad(model64, params64, t64, **options)) for t, t64 in tasks]
    autograd = median_error(lambda t: reference_meta_grad(model, params, t, **options), exact, rel_err)
    algo = build_algorithm({"name": "maml", "order": order, "adapt": adapt, "inner_steps": steps,
                            "inner_lr": 0.4}, model)
    for path in algo.executions:
        algo = algo.with_execution(path)
        error = median_error(lambda t: algo.meta_grad(params, t).grad, exact, rel_err)
        assert error <= 2 * autograd, f"{path}: {error:.2e} vs plain autograd {autograd:.2e}"
        if steps == 1:
            assert error <= 1e-4, f"{path}: {error:.2e}"


@pytest.mark.parametrize("config", [
    {"name": "entropy_sgd", "noise": 0.0, "inner_steps": 2},
    {"name": "entropy_sgd", "noise": 0.0, "adapt": "head"},
], ids=["entropy_sgd-2", "entropy_sgd-head"])
def test_entropy_sgd_paths_are_accurate_off_its_defaults(single_thread, rel_err, config):
    model, params, batch = real_size(1, "random")
    model64, params64, tasks = tasks64(model, params, batch)
    algo, algo64 = build_algorithm(config, model), build_algorithm(config, model64)
    algo64 = algo64.with_execution("vmap")
    exact = [(t, algo64.meta_grad(params64, t64).grad) for t, t64 in tasks]
    errors = {}
    for path in algo.executions:
        algo = algo.with_execution(path)
        errors[path] = median_error(lambda t: algo.meta_grad(params, t).grad, exact, rel_err)
    for path, error in errors.items():
        assert error <= max(2 * errors["vmap"], 1e-6) and error <= 1e-4, errors


def test_entropy_sgd_direction_has_no_cancellation(rel_err):
    """``γ (x − μ)`` with a head far from its displacement (‖W_0‖ ≫ ‖W − W_0‖): carried as the
    displacement, the float32 direction keeps float32 accuracy."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=16, layers=2), (8,), 4).to(DEVICE)
    params = model.init_params()
    params["head.weight"] = params["head.weight"] * 1e3
    x = torch.randn(1, 12, 8).to(DEVICE)
    y = torch.arange(4, device=DEVICE).repeat_interleave(3)[None]
    batch = labelled_batch(x, y, x, y, ways=4)
    config = {"name": "entropy_sgd", "noise": 0.0, "adapt": "head", "inner_lr": 1e-3, "inner_steps": 3}
    algo, algo64 = build_algorithm(config, model), build_algorithm(config, copy.deepcopy(model).double())
    exact = algo64.meta_grad({k: v.double() for k, v in params.items()},
                             batch.to(dtype=torch.float64)).grad
    head = ("head.weight", "head.bias")
    got = algo.meta_grad(params, batch).grad
    assert rel_err({k: got[k].double() for k in head}, {k: exact[k] for k in head}) < 1e-4


def test_conv_decisions_impose_on_the_chosen_blocks_only():
    """A replay on ``blocks`` takes the recording's decisions there and decides for itself elsewhere:
    on no block it is the free forward, on every block the full replay."""
    p = seeded_problem("conv4", ways=WAYS, shots=1, queries=2, tasks=1, seed=3)
    x = p.batch.support_x[0]
    other = {k: v + 0.3 * torch.randn_like(v) for k, v in p.params.items()}
    decisions = []
    with conv_decisions(decisions, replay=False):
        functional_call(p.model, p.params, (x,))

    def replayed(blocks):
        with conv_decisions(decisions, replay=True, blocks=blocks):
            return functional_call(p.model, other, (x,))

    blocks = list(p.model.encoder.blocks)
    assert torch.equal(replayed([]), functional_call(p.model, other, (x,)))
    assert torch.equal(replayed(blocks), replayed(None))
    assert not torch.equal(replayed(blocks[:1]), replayed([]))
