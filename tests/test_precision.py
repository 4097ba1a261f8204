"""Float32 accuracy of every execution path, at the real model size.

conv4 with 64 channels on 1×28×28 Gaussian images, 5-way, 15 queries per class. Each task's
float32 meta-gradient is compared with the same task computed in float64 (model, parameters and
images cast up); the error of a path is the median over tasks of ``‖g − g64‖ / ‖g64‖`` (three
tasks; nine for MAML against plain autograd). The median, because float32 error is round-off
(~1e-6) plus rare discrete events — a max-pool or ReLU decision that a 1e-7 perturbation flips,
1e-4 – 1e-2 on that task — which strike every implementation at random points
(``docs/performance.md``). Nine tasks for MAML, because its multi-step cells put every
implementation's per-task error anywhere in 1e-6 – 3e-5 (the first conv's weight gradient, a sum
that cancels): over three tasks the ratio of two medians is a coin toss, over nine it is within
1.3× on two seeds.

Targets: MAML's paths within 2× the error of an independent plain-autograd loop
(``bilevel.testing.reference_meta_grad``) and ≤ 1e-4 on one-step cells; iMAML's and Entropy-SGD's
paths within 2× their own ``vmap`` path (``torch.func``, the default layout) and ≤ 1e-4.
``BILEVEL_TEST_DEVICE=cuda`` runs the same checks on a GPU (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

import copy
import os
import statistics

import pytest
import torch

from bilevel import ModelConfig, build_algorithm, build_model
from bilevel.testing import labelled_batch, reference_meta_grad, seeded_problem

WAYS, QUERIES, SHAPE, TASKS, MAML_TASKS = 5, 15, (1, 28, 28), 3, 9
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
    {"name": "imaml"},
    {"name": "entropy_sgd", "noise": 0.0, "inner_steps": 1},
    {"name": "entropy_sgd", "noise": 0.0, "inner_steps": 2},
    {"name": "entropy_sgd", "noise": 0.0, "adapt": "head"},
], ids=["imaml", "entropy_sgd-1", "entropy_sgd-2", "entropy_sgd-head"])
def test_imaml_and_entropy_sgd_paths_are_accurate(single_thread, rel_err, config):
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
