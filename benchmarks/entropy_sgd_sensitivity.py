"""Why Entropy-SGD's float32 direction is far from float64's at its defaults (issue 20): measurements.

The problem is the one of ``tests/test_precision.py``: conv4 (64 channels) on 1×28×28 Gaussian images,
5-way 1-shot with 15 queries, the chain over the pooled 80-image batch, seed 0, noise 0. The chain is
traced step by step by :func:`trace` (the map of ``bilevel.testing.reference_chain_direction``,
checked against it in float64), recording each step's gradient, displacement and conv decisions
(``bilevel.testing.conv_decisions``).

Parts (``--parts``):

* ``sweep``: float64 only. The parameters perturbed element-wise, ``x (1 + ε n)`` with ``n`` standard
  normal, for ε = 1e-9 … 1e-3; per ε the relative change of ``d``, of each step's gradient and
  displacement, and the number of max-pool / ReLU decisions that differ per step and block.
* ``flip``: float64, one step. The smallest ε (doubling from 1e-8) at which the first step meets a
  decision flip, and the jump of that step's gradient: the perturbed gradient against the same
  point with the unperturbed decisions imposed (the smooth part removed), per layer.
* ``structure``: float64, unperturbed. Per step and layer the gradient norms, ``‖d‖`` against the sum
  of the norms of its per-step terms (cancellation), the per-channel variance of every BatchNorm
  input against its ``eps``, the channels dead over the whole batch and the fraction of ReLU zeros.
* ``float32``: the float32 chain against float64 per task: the raw error, the decisions that differ
  per step (where the cascade starts), and the error with float64's decisions imposed on one
  block at a time and on all blocks.
* ``configs``: the raw float32 error of chains and of MAML off the defaults (inner step, batch, number
  of steps, EMA, coupling; first-order MAML with 5 steps on the pooled batch), with
  ``bilevel.testing.reference_chain_direction`` or ``reference_meta_grad``.
* ``noise``: at the true defaults (noise 1e-4), how far apart two noise seeds put the float64 direction.
* ``engine``: the engine's raw and decision-matched float32 error, every path, at the defaults and
  with ``batches=support`` (``bilevel.testing.float32_errors``).

``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/entropy_sgd_sensitivity.py --parts sweep flip ...``
writes ``benchmarks/results/entropy_sgd_sensitivity.json`` (each part's key replaced).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel.data.batch import TaskBatch
from bilevel.primitives.batchnorm import SetBatchNorm
from bilevel.testing import (
    NoiselessChain, conv_decisions, reference_chain_direction, reference_meta_grad, rel_err, seeded_problem,
)

RESULTS = Path(__file__).resolve().parent / "results" / "entropy_sgd_sensitivity.json"
DEFAULT = NoiselessChain(steps=5, lr=0.1, gamma=1.0, ema=0.75, scale=1.0)  # configs/algorithm/entropy_sgd.yaml, t = 0
EPS = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
LAYERS = {**{f"block{i}": f"encoder.blocks.{i}." for i in range(4)}, "head": "head."}


@dataclass
class Trace:
    """The direction ``d``, and per step: the gradient, the displacement ``x'_ℓ − x``, the loss and
    the conv decisions (one ``(argmax, positive)`` per block)."""

    direction: dict
    grads: list
    moved: list
    losses: list
    decisions: list


def trace(model: torch.nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, chain: NoiselessChain,
          impose: Optional[list] = None, blocks: Optional[list] = None) -> Trace:
    """The noiseless chain ``x'_ℓ = x'_{ℓ−1} − η' (∇f(x'_{ℓ−1}) + γ (x'_{ℓ−1} − x))``, ``μ_ℓ = (1 − a) μ_{ℓ−1}
    + a x'_ℓ``, ``d = s (x − μ_L)`` over every parameter (displacements carried from ``x``; schedule
    ``chain``), each step recording its decisions, or (``impose``: a :class:`Trace`'s decisions)
    replaying them on ``blocks``."""
    start = {k: v.detach() for k, v in params.items()}
    moved = {k: torch.zeros_like(v) for k, v in start.items()}
    mean = dict(moved)
    out = Trace({}, [], [], [], [])
    for step in range(chain.steps):
        leaves = {k: (start[k] + moved[k]).requires_grad_() for k in start}
        decisions = [] if impose is None else impose[step]
        with conv_decisions(decisions, replay=impose is not None, blocks=blocks):
            loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        moved = {k: moved[k] - chain.lr * (grads[k] + chain.gamma * moved[k]) for k in start}
        mean = {k: (1 - chain.ema) * mean[k] + chain.ema * moved[k] for k in start}
        out.grads.append(grads), out.moved.append(moved), out.losses.append(float(loss.detach()))
        out.decisions.append(decisions)
    out.direction = {k: -chain.scale * m for k, m in mean.items()}
    return out


def layer_norms(p: dict) -> dict[str, float]:
    return {name: sum(float(v.double().pow(2).sum()) for k, v in p.items() if k.startswith(pre)) ** 0.5
            for name, pre in LAYERS.items()}


def flips(a: list, b: list) -> list[list[int]]:
    """Per block: ``[max-pool argmaxes that differ, ReLU signs that differ]``."""
    return [[int((ia != ib).sum()), int((pa != pb).sum())] for (ia, pa), (ib, pb) in zip(a, b)]


def perturbed(params: dict, eps: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v * (1 + eps * torch.randn(v.shape, generator=gen, dtype=v.dtype)) for k, v in params.items()}


class Problem:
    """The test's float32 model, parameters and tasks, with float64 copies; ``pooled(i)`` the chain's batch."""

    def __init__(self, tasks: int) -> None:
        p = seeded_problem("conv4", dtype=torch.float32, ways=5, shots=1, queries=15, tasks=tasks, shape=(1, 28, 28),
                           channels=None, head="random", seed=0)
        self.model, self.params, self.batch, self.tasks = p.model, p.params, p.batch, tasks
        self.model64 = copy.deepcopy(p.model).to(torch.float64)
        self.params64 = {k: v.to(torch.float64) for k, v in p.params.items()}

    def pooled(self, i: int, dtype=torch.float32, batches: str = "pooled"):
        t = self.batch.task(i).to(dtype=dtype)
        sx, sy, qx, qy = t.support_x[0], t.support_y[0], t.query_x[0], t.query_y[0]
        return {"pooled": (torch.cat([sx, qx]), torch.cat([sy, qy])), "support": (sx, sy), "query": (qx, qy)}[batches]


def part_sweep(pb: Problem, draws: int) -> dict:
    rows = []
    for i in range(pb.tasks):
        x, y = pb.pooled(i, torch.float64)
        base = trace(pb.model64, pb.params64, x, y, DEFAULT)
        if i == 0:
            ref = reference_chain_direction(pb.model64, pb.params64, x, y, DEFAULT)
            assert rel_err(base.direction, ref) < 1e-12, "trace is not the reference chain"
        for eps in EPS:
            for draw in range(draws):
                pert = trace(pb.model64, perturbed(pb.params64, eps, 1000 * i + draw), x, y, DEFAULT)
                rows.append(dict(task=i, eps=eps, draw=draw, direction=rel_err(pert.direction, base.direction),
                                 grads=[rel_err(a, b) for a, b in zip(pert.grads, base.grads)],
                                 moved=[rel_err(a, b) for a, b in zip(pert.moved, base.moved)],
                                 flips=[flips(a, b) for a, b in zip(pert.decisions, base.decisions)]))
                r = rows[-1]
                print(f"task {i} eps {eps:.0e} draw {draw}: d {r['direction']:.1e}  grads "
                      + " ".join(f"{v:.1e}" for v in r["grads"]) + "  pool flips/step "
                      + " ".join(str(sum(b[0] for b in s)) for s in r["flips"]), flush=True)
    return {"rows": rows}


def part_flip(pb: Problem) -> dict:
    rows = []
    one = replace(DEFAULT, steps=1)
    for i in range(pb.tasks):
        x, y = pb.pooled(i, torch.float64)
        base = trace(pb.model64, pb.params64, x, y, one)
        eps = 1e-8
        while eps < 1e-3:
            params = perturbed(pb.params64, eps, 7 + i)
            pert = trace(pb.model64, params, x, y, one)
            count = flips(pert.decisions[0], base.decisions[0])
            if sum(sum(c) for c in count):
                smooth = trace(pb.model64, params, x, y, one, impose=base.decisions)
                jump, g = pert.grads[0], smooth.grads[0]
                delta = {k: jump[k] - g[k] for k in g}
                rows.append(dict(task=i, eps=eps, flips=count, jump=rel_err(jump, g),
                                 smooth=rel_err(g, base.grads[0]), jump_per_layer=layer_norms(delta),
                                 grad_per_layer=layer_norms(g)))
                print(f"task {i}: eps {eps:.1e} flips {count} jump {rows[-1]['jump']:.2e} "
                      f"(smooth {rows[-1]['smooth']:.1e})", flush=True)
                break
            eps *= 2
    return {"rows": rows}


def bn_statistics(model, params, x) -> list[dict]:
    """Per block: per-channel variance of the BatchNorm input (min, median, count below 100·eps),
    channels whose ReLU output is zero on the whole batch, fraction of ReLU zeros."""
    stats = []
    hooks = [m.register_forward_hook(lambda m, inp, out: stats.append(dict(
        var=inp[0].transpose(0, 1).flatten(1).var(1, unbiased=False), eps=m.eps)))
        for m in model.modules() if isinstance(m, SetBatchNorm)]
    decisions = []
    try:
        with torch.no_grad(), conv_decisions(decisions, replay=False):
            functional_call(model, params, (x,))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for s, (_, positive) in zip(stats, decisions):
        var = s["var"]
        per_channel = positive.transpose(0, 1).flatten(1)
        out.append(dict(var_min=float(var.min()), var_median=float(var.median()), eps=s["eps"],
                        below_100eps=int((var < 100 * s["eps"]).sum()),
                        dead_channels=int((~per_channel.any(1)).sum()),
                        relu_zero_fraction=float(1 - positive.double().mean())))
    return out


def part_structure(pb: Problem) -> dict:
    rows = []
    weights = [sum(DEFAULT.ema * (1 - DEFAULT.ema) ** (5 - k) * (1 - DEFAULT.lr * DEFAULT.gamma) ** (k - l)
                   for k in range(l, 6)) for l in range(1, 6)]  # d = Σ_ℓ s η' w_ℓ g_ℓ
    for i in range(pb.tasks):
        x, y = pb.pooled(i, torch.float64)
        t = trace(pb.model64, pb.params64, x, y, DEFAULT)
        start = dict(pb.params64)
        parts = sum(DEFAULT.lr * w * sum(float(v.pow(2).sum()) for v in g.values()) ** 0.5
                    for w, g in zip(weights, t.grads))
        dnorm = sum(float(v.pow(2).sum()) for v in t.direction.values()) ** 0.5
        bn = [bn_statistics(pb.model64, {k: start[k] + m[k] for k in start}, x)
              for m in [{k: torch.zeros_like(v) for k, v in start.items()}] + t.moved[:-1]]
        rows.append(dict(task=i, losses=t.losses, direction_norm=dnorm, sum_of_term_norms=parts,
                         cancellation=parts / dnorm, grads=[layer_norms(g) for g in t.grads],
                         moved=[layer_norms(m) for m in t.moved], params=layer_norms(start), bn=bn))
        print(f"task {i}: |d| {dnorm:.3f}, sum of |terms| {parts:.3f} (ratio {parts / dnorm:.2f}); "
              f"losses {' '.join(f'{v:.2f}' for v in t.losses)}; BN var min per block (step 1) "
              + " ".join(f"{b['var_min']:.2e}" for b in bn[0])
              + "; dead channels " + " ".join(str(b['dead_channels']) for b in bn[0]), flush=True)
    return {"rows": rows, "step_weights": weights}


def part_float32(pb: Problem) -> dict:
    rows = []
    blocks = list(pb.model.encoder.blocks)
    for i in range(pb.tasks):
        x64, y = pb.pooled(i, torch.float64)
        x32, _ = pb.pooled(i, torch.float32)
        exact = trace(pb.model64, pb.params64, x64, y, DEFAULT)
        raw = trace(pb.model, pb.params, x32, y, DEFAULT)
        row = dict(task=i, raw=rel_err(_double(raw.direction), exact.direction),
                   grads=[rel_err(_double(a), b) for a, b in zip(raw.grads, exact.grads)],
                   flips=[flips(a, b) for a, b in zip(raw.decisions, exact.decisions)])
        for b in range(4):
            t = trace(pb.model, pb.params, x32, y, DEFAULT, impose=exact.decisions, blocks=[blocks[b]])
            row[f"imposed_block{b}"] = rel_err(_double(t.direction), exact.direction)
        t = trace(pb.model, pb.params, x32, y, DEFAULT, impose=exact.decisions)
        row["imposed_all"] = rel_err(_double(t.direction), exact.direction)
        rows.append(row)
        print(f"task {i}: raw {row['raw']:.1e}; pool flips/step "
              + " ".join(str(sum(b[0] for b in s)) for s in row["flips"])
              + "; imposed on block 0..3 " + " ".join(f"{row[f'imposed_block{b}']:.1e}" for b in range(4))
              + f"; all {row['imposed_all']:.1e}", flush=True)
    return {"rows": rows, "median_raw": statistics.median(r["raw"] for r in rows)}


def part_noise(pb: Problem) -> dict:
    """At the true defaults (noise 1e-4): the spread of the float64 direction over two noise seeds,
    and its distance from the noiseless direction, per task (engine, ``loop``)."""
    from bilevel import build_algorithm
    from bilevel.testing import default_config

    config = default_config("entropy_sgd")
    algos = [build_algorithm({**config, **extra}, pb.model64).with_execution("loop")
             for extra in ({"seed": 0}, {"seed": 1}, {"noise": 0.0})]
    rows = []
    for i in range(pb.tasks):
        task = pb.batch.task(i).to(dtype=torch.float64)
        seed0, seed1, quiet = (a.meta_grad(pb.params64, task).grad for a in algos)
        rows.append(dict(task=i, seeds=rel_err(seed1, seed0), noiseless=rel_err(seed0, quiet)))
        print(f"task {i}: two noise seeds differ by {rows[-1]['seeds']:.2e}; noise vs none {rows[-1]['noiseless']:.2e}",
              flush=True)
    return {"rows": rows, "median_seeds": statistics.median(r["seeds"] for r in rows)}


ENGINE = {"defaults": {}, "support batch": {"batches": "support"}}  # noise 0 on top of each: float32 and float64 draw differently


def part_engine(pb: Problem) -> dict:
    """The engine's float32 error at Entropy-SGD's defaults and at each variant of :data:`ENGINE`, every
    path, raw and decision-matched (``bilevel.testing.float32_errors``: the issue-20 numbers)."""
    from bilevel import build_algorithm
    from bilevel.testing import default_config, float32_errors

    out = {}
    tasks = [pb.batch.task(i) for i in range(pb.tasks)]
    for name, overrides in ENGINE.items():
        algo = build_algorithm({**default_config("entropy_sgd"), "noise": 0.0, **overrides}, pb.model)
        errors, _ = float32_errors(algo, algo.meta_parameters(pb.params), tasks)
        out[f"{name}, {pb.tasks} tasks"] = {path: dict(raw=raw, matched=matched) for path, (raw, matched) in errors.items()}
        for path, (raw, matched) in errors.items():
            print(f"{name} {path}: raw median {statistics.median(raw):.1e} max {max(raw):.1e}; matched median "
                  f"{statistics.median(matched):.1e} max {max(matched):.1e}", flush=True)
    return out


def _double(p: dict) -> dict:
    return {k: v.double() for k, v in p.items()}


CONFIGS = {  # name: chain overrides of DEFAULT, batch
    "default": ({}, "pooled"),
    "lr 0.03": ({"lr": 0.03}, "pooled"),
    "lr 0.01": ({"lr": 0.01}, "pooled"),
    "support batch": ({}, "support"),
    "query batch": ({}, "query"),
    "2 steps": ({"steps": 2}, "pooled"),
    "3 steps": ({"steps": 3}, "pooled"),
    "ema 0.25, gamma 1e-4 (authors' code)": ({"ema": 0.25, "gamma": 1e-4}, "pooled"),
    "reptile (gamma 0, ema 1)": ({"gamma": 0.0, "ema": 1.0}, "pooled"),
}


def part_configs(pb: Problem, names: Optional[list[str]]) -> dict:
    out: dict[str, Any] = {}
    for name, (overrides, batches) in CONFIGS.items():
        if names and name not in names:
            continue
        spec = replace(DEFAULT, **overrides)
        errors = []
        for i in range(pb.tasks):
            x64, y = pb.pooled(i, torch.float64, batches)
            x32, _ = pb.pooled(i, torch.float32, batches)
            exact = reference_chain_direction(pb.model64, pb.params64, x64, y, spec)
            got = reference_chain_direction(pb.model, pb.params, x32, y, spec)
            errors.append(rel_err(_double(got), exact))
        out[f"{name}, {pb.tasks} tasks"] = _summary(name, errors)
    for name, lr, steps in (("fomaml pooled support, 5 steps lr 0.1", 0.1, 5), ("fomaml support, 5 steps lr 0.1", 0.1, 5)):
        if names and name not in names:
            continue
        errors = []
        for i in range(pb.tasks):
            task = pb.batch.task(i)
            if "pooled" in name:
                task = _pooled_support(task)
            options = dict(steps=steps, lr=lr, adapt="all", first_order=True)
            exact = reference_meta_grad(pb.model64, pb.params64, task.to(dtype=torch.float64), **options)
            errors.append(rel_err(_double(reference_meta_grad(pb.model, pb.params, task, **options)), exact))
        out[f"{name}, {pb.tasks} tasks"] = _summary(name, errors)
    return out


def _pooled_support(task: TaskBatch) -> TaskBatch:
    """The task with its support set replaced by support + query (the chain's pooled batch)."""
    return TaskBatch(torch.cat([task.support_x, task.query_x], 1), torch.cat([task.support_y, task.query_y], 1),
                     task.query_x, task.query_y, task.classes)


def _summary(name: str, errors: list[float]) -> dict:
    s = dict(errors=errors, median=statistics.median(errors), max=max(errors),
             above_1e3=sum(e > 1e-3 for e in errors))
    print(f"{name}: median {s['median']:.1e}, max {s['max']:.1e}, tasks > 1e-3: {s['above_1e3']}", flush=True)
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["flip", "structure", "float32", "sweep", "configs", "noise", "engine"],
                        choices=["sweep", "flip", "structure", "float32", "configs", "noise", "engine"])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--draws", type=int, default=1, help="perturbation draws per task and ε (sweep)")
    parser.add_argument("--configs", nargs="*", default=None, help="only these CONFIGS names (configs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pb = Problem(args.tasks)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for part in args.parts:
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "sweep":
            results[part] = part_sweep(pb, args.draws)
        elif part in ("configs", "engine"):
            found = part_configs(pb, args.configs) if part == "configs" else part_engine(pb)
            results[part] = {**results.get(part, {}), **found}
        else:
            results[part] = {"flip": part_flip, "structure": part_structure, "float32": part_float32,
                             "noise": part_noise}[part](pb)
        results[part]["seconds"] = time.perf_counter() - t0
        results[part]["tasks"] = args.tasks
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
