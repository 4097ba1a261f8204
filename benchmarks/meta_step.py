"""Seconds per meta-step of this project's MAML against per-task ``higher`` and ``torch.autograd`` loops.

A meta-step is the meta-gradient of one meta-batch plus one Adam step on the parameters.
Methods, all on the same batches and in the same run (round-robin, see ``common.py``):

* ``ours:<path>``: ``build_algorithm({"name": "maml", ...}).meta_grad(params, batch)`` on each
  execution path in ``algo.executions`` (vmap, loop; shared for head-only inner loops);
* ``higher``: a per-task loop with ``higher.innerloop_ctx`` (second order:
  ``track_higher_grads=True`` and backward to the initial weights; first order:
  ``track_higher_grads=False`` and the query gradient at the fast weights);
* ``autograd``: a per-task loop with ``torch.autograd.grad(create_graph=second_order)`` on a
  ``torch.func.functional_call`` (the style of the paper's code).

Head-only cells (``adapt=head``) adapt only the head in the baselines as well; their encoder
gets its gradient through the support features (second order) and the query features.

The baselines run conv4 as the paper's code writes it (``--baseline-model paper``, default:
``torch.nn`` layers, ``NCHW``, see ``paper_conv4.py``) or this project's model called the way
a hand-written loop calls it (``--baseline-model ours``: same layers as ours, default
activation layout); either way with the same parameter values, and the gradient check below
confirms they compute the same meta-gradient.

The *default path* is the one the trainer's ``execution=auto`` picks: the fastest of ours
measured in the same run. Goals checked: on CPU the default path is never slower than the
fastest baseline (ratio ≥ 1); on CUDA it is ≥ 3× faster than ``higher`` at meta-batch 32.
Before timing, every method's gradient at the same parameters and batch is compared with
``ours:loop`` (column ``grad diff``: largest relative difference over the methods) and, in
float32, with the same tasks computed in float64 (columns ``err <method>``: the median over
8 tasks of each method's relative float32 error; goal: the default path's is at most 2x the
autograd loop's).

    PYTHONPATH=. python benchmarks/meta_step.py --out meta_step.json            # full grid
    PYTHONPATH=. python benchmarks/meta_step.py --quick                         # 4 small cells
    PYTHONPATH=. python benchmarks/meta_step.py --meta-batch 32 --device cuda   # a sub-grid

``--defaults NAME ...`` replaces the grid by the float32 error rows of whole algorithms, each at its
own default configuration (``configs/algorithm/NAME.yaml``, else the plugin's defaults; Entropy-SGD
without noise, since float32 and float64 would draw different noise), per execution path, on 1-shot
tasks: the median and largest error over ``ERROR_TASKS`` tasks, raw and decision-matched (the
float64 run's max-pool and ReLU decisions imposed, ``bilevel.testing.float32_errors``: round-off
alone). ``--example-plugins`` registers the example plugins (Reptile, BOIL, ProtoMAML) first.

    PYTHONPATH=. python benchmarks/meta_step.py --threads 1 --example-plugins \
        --defaults maml fomaml anil imaml entropy_sgd r2d2 meta_sgd reptile boil protomaml
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
from typing import TYPE_CHECKING, Any

from common import (
    INNER_LR, ORDERS, OUTER_LR, EngineStep, add_common_args, cell_batches, cycling_steps, finish, grad_rel_diff,
    parse_grid_args, print_table, start, time_methods,
)

if TYPE_CHECKING:
    from bilevel.data.batch import TaskBatch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--baselines", nargs="*", default=["higher", "autograd"], choices=("higher", "autograd"))
    parser.add_argument("--defaults", nargs="+", default=None, metavar="NAME",
                        help="instead of the grid: float32-vs-float64 error rows of these algorithms at their defaults")
    parser.add_argument("--example-plugins", action="store_true", help="register the example plugins (Reptile, BOIL, ProtoMAML) first")
    parser.add_argument("--baseline-model", default="paper", choices=("paper", "ours"),
                        help="the conv4 the baselines run: torch.nn layers as the paper's code writes them "
                             "(paper_conv4.py), or this project's model (engine-only comparison)")
    return parse_grid_args(parser, (4, 16, 32), ("all", "head"))


class HigherLoop:
    """Per-task loop with ``higher.innerloop_ctx`` over the model (or its head), then Adam."""

    def __init__(self, model, params: dict, adapt: str, order: str, steps: int) -> None:
        import torch

        self.module = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in self.module.named_parameters():
                p.copy_(params[k])
        self.adapted = self.module.head if adapt == "head" else self.module
        self.inner_opt = torch.optim.SGD(self.adapted.parameters(), lr=INNER_LR)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=OUTER_LR)
        self.head_only, self.second_order, self.steps = adapt == "head", order == "second_order", steps

    def grads(self, batch: TaskBatch) -> dict:
        import higher
        import torch
        import torch.nn.functional as F

        params = dict(self.module.named_parameters())
        for p in params.values():
            p.grad = None
        tasks = batch.support_x.shape[0]
        for i in range(tasks):
            xs, ys, xq, yq = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
            if self.head_only:
                xs, xq = self.module.encoder(xs), self.module.encoder(xq)
            with higher.innerloop_ctx(self.adapted, self.inner_opt, copy_initial_weights=False,
                                      track_higher_grads=self.second_order) as (fmodel, diffopt):
                for _ in range(self.steps):
                    diffopt.step(F.cross_entropy(fmodel(xs), ys))
                loss = F.cross_entropy(fmodel(xq), yq) / tasks
                if self.second_order:
                    loss.backward()
                    continue
                fast = list(fmodel.parameters())
                encoder = list(self.module.encoder.parameters()) if self.head_only else []
                got = torch.autograd.grad(loss, encoder + fast)
                targets = encoder + list(self.adapted.parameters())
                for p, g in zip(targets, got):
                    p.grad = g if p.grad is None else p.grad + g
        return {k: p.grad for k, p in params.items()}

    def step(self, batch: TaskBatch) -> None:
        self.grads(batch)
        self.opt.step()


class AutogradLoop:
    """Per-task loop with ``torch.autograd.grad`` on ``functional_call`` (paper style), then Adam."""

    def __init__(self, model, params: dict, adapt: str, order: str, steps: int) -> None:
        import torch

        self.model = model
        self.params = {k: v.clone().requires_grad_() for k, v in params.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=OUTER_LR)
        self.head_only, self.second_order, self.steps = adapt == "head", order == "second_order", steps

    def grads(self, batch: TaskBatch) -> dict:
        import torch
        import torch.nn.functional as F
        from torch.func import functional_call

        from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, encoder_part

        for p in self.params.values():
            p.grad = None
        tasks = batch.support_x.shape[0]
        for i in range(tasks):
            xs, ys, xq, yq = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
            if self.head_only:
                encoder = encoder_part(self.params)
                fs, fq = self.model.encode(encoder, xs), self.model.encode(encoder, xq)
                fast = {HEAD_WEIGHT: self.params[HEAD_WEIGHT], HEAD_BIAS: self.params[HEAD_BIAS]}
                forward = lambda w, x: F.linear(x, w[HEAD_WEIGHT], w[HEAD_BIAS])  # noqa: E731
            else:
                fs, fq, fast = xs, xq, dict(self.params)
                forward = lambda w, x: functional_call(self.model, w, (x,))  # noqa: E731
            for _ in range(self.steps):
                loss = F.cross_entropy(forward(fast, fs), ys)
                got = torch.autograd.grad(loss, list(fast.values()), create_graph=self.second_order)
                fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), got)}
            (F.cross_entropy(forward(fast, fq), yq) / tasks).backward()
        return {k: p.grad for k, p in self.params.items()}

    def step(self, batch: TaskBatch) -> None:
        self.grads(batch)
        self.opt.step()


ERROR_TASKS = 8


def float32_errors(methods: dict[str, Any], model, params: dict, batches: list, adapt: str, order: str,
                   steps: int) -> dict[str, list[float]]:
    """Per task (the first ``ERROR_TASKS`` of the cell's batches), each method's relative error
    ``‖g − g64‖ / ‖g64‖`` against the same task computed in float64 (model, parameters and
    images cast up) by the plain-autograd loop on this project's model (in float64 every method
    agrees with it to ~1e-14). The table reports the median over the tasks: float32 error is
    round-off (~1e-6) plus rare discrete events (a max-pool or ReLU decision that a 1e-7
    perturbation flips: 1e-4 – 1e-2 on that task) which strike every implementation at random
    points; the median measures the first, the per-task lists in the JSON show the second."""
    import torch

    model64 = copy.deepcopy(model).to(torch.float64)
    params64 = {k: v.to(torch.float64) for k, v in params.items()}
    errors: dict[str, list[float]] = {name: [] for name in methods}
    tasks = [b.task(i) for b in batches for i in range(b.num_tasks)][:ERROR_TASKS]
    for task in tasks:
        task64 = task.to(dtype=torch.float64)
        exact = AutogradLoop(model64, params64, adapt, ORDERS[order], steps).grads(task64)
        for name, method in methods.items():
            errors[name].append(grad_rel_diff(method.grads(task), exact))
    return errors


def run_cell(model, params, batches, adapt: str, order: str, steps: int, args, device) -> dict[str, Any]:
    """Time every method of one grid cell; the row of the JSON output."""
    from bilevel import build_algorithm

    config = {"name": "maml", "adapt": adapt, "order": ORDERS[order], "inner_steps": steps, "inner_lr": INNER_LR}
    algo = build_algorithm(config, model)
    methods: dict[str, Any] = {f"ours:{p}": EngineStep(algo, p, params) for p in algo.executions}
    baselines = {"higher": HigherLoop, "autograd": AutogradLoop}
    if args.baseline_model == "paper":
        from paper_conv4 import PaperConv4

        baseline_model = PaperConv4(model)
    else:
        baseline_model = model
    for name in args.baselines:
        methods[name] = baselines[name](baseline_model, params, adapt, ORDERS[order], steps)
    errors = float32_errors(methods, model, params, batches, adapt, order, steps) if args.dtype == "float32" else {}
    warmups = {name: (lambda m=m: m.grads(batches[0])) for name, m in methods.items()}
    grads, records = time_methods(warmups, cycling_steps(methods, batches), device, args)
    reference = grads["ours:loop"]
    for name, rec in records.items():
        rec["grad_rel_diff_vs_ours_loop"] = grad_rel_diff(grads[name], reference)
        rec["error_vs_float64_per_task"] = errors.get(name)
        rec["error_vs_float64"] = statistics.median(errors[name]) if name in errors else None
    ours = {n[5:]: r["median_s"] for n, r in records.items() if n.startswith("ours:")}
    default = min(ours, key=ours.__getitem__)
    base = {n: r["median_s"] for n, r in records.items() if not n.startswith("ours:")}
    tasks = batches[0].support_x.shape[0]
    row: dict[str, Any] = {
        "adapt": adapt, "order": order, "shots": batches[0].support_x.shape[1] // args.ways,
        "inner_steps": steps, "meta_batch": tasks, "methods": records,
        "default_path": default, "default_s": ours[default], "default_tasks_per_s": tasks / ours[default],
    }
    if base:
        fastest = min(base.values())
        row["ratio_fastest_baseline_over_default"] = fastest / ours[default]
        row["ratio_fastest_baseline_over_path"] = {p: fastest / t for p, t in ours.items()}
        row["ratio_baseline_over_default"] = {n: t / ours[default] for n, t in base.items()}
    return row


PATHS = ("vmap", "loop", "shared")
"""The execution paths of ours, in the tables' column order."""


def report(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Print the tables and the goal checks; returns the summary."""
    print_time_table(rows, args.baselines, device)
    if not args.baselines:
        return {}
    print_speedup_table(rows, args.baselines)
    return goal_checks(rows, args, device)


def print_time_table(rows: list[dict[str, Any]], baselines: list[str], device: torch.device) -> None:
    """Per cell: ms per meta-step of every method, the default path, its tasks/s, the largest gradient
    difference and each method's float32 error (and on CUDA the peak memory)."""
    print("\nms per meta-step (median); default = fastest of ours (what execution=auto picks)")
    header = ["adapt", "ord", "shot", "K", "T", *PATHS, *baselines, "default", "tasks/s", "grad diff",
              *(f"err {p}" for p in PATHS), *(f"err {b}" for b in baselines)]
    if device.type == "cuda":
        header.append("peak MB (default/higher)")
    lines = []
    for r in rows:
        m = r["methods"]
        ms = lambda name: m[name]["median_s"] * 1e3 if name in m else None  # noqa: E731
        err = lambda name: m[name]["error_vs_float64"] if name in m else None  # noqa: E731
        line = [r["adapt"], r["order"], r["shots"], r["inner_steps"], r["meta_batch"],
                *(ms(f"ours:{p}") for p in PATHS), *(ms(b) for b in baselines),
                r["default_path"], r["default_tasks_per_s"],
                max(v["grad_rel_diff_vs_ours_loop"] for v in m.values()),
                *(err(f"ours:{p}") for p in PATHS), *(err(b) for b in baselines)]
        if device.type == "cuda":
            peak = lambda name: m[name]["peak_bytes"] / 2**20 if name in m else None  # noqa: E731
            line.append(f"{peak('ours:' + r['default_path']):.0f}/{peak('higher') or 0:.0f}")
        lines.append(line)
    print_table(header, lines)


def print_speedup_table(rows: list[dict[str, Any]], baselines: list[str]) -> None:
    """Per cell: each baseline's time over the default path's, and the fastest baseline's over each path's."""
    print("\nspeed-up = baseline time / our time (> 1: ours is faster)")
    header = ["adapt", "ord", "shot", "K", "T", *(f"{b}/default" for b in baselines),
              "best/default", *(f"best/{p}" for p in PATHS)]
    lines = [[r["adapt"], r["order"], r["shots"], r["inner_steps"], r["meta_batch"],
              *(r["ratio_baseline_over_default"][b] for b in baselines),
              r["ratio_fastest_baseline_over_default"],
              *(r["ratio_fastest_baseline_over_path"].get(p) for p in PATHS)] for r in rows]
    print_table(header, lines)


def goal_checks(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Print the goals (module docstring) met per cell; returns them by name: cells met, measured, failed."""
    summary: dict[str, Any] = {}
    cell = lambda r: f"{r['adapt']}/{r['order']}/{r['shots']}-shot/K={r['inner_steps']}/T={r['meta_batch']}"  # noqa: E731
    if args.dtype == "float32" and "autograd" in args.baselines:
        def accurate(r):
            m = r["methods"]
            return m["ours:" + r["default_path"]]["error_vs_float64"] <= 2 * m["autograd"]["error_vs_float64"]
        fails = [cell(r) for r in rows if not accurate(r)]
        summary["goal_default_error_within_2x_autograd_loop"] = {
            "met": len(rows) - len(fails), "cells": len(rows), "failed": fails}
        print(f"\naccuracy: default path's error vs float64 <= 2x the autograd loop's: met in "
              f"{len(rows) - len(fails)}/{len(rows)} cells" + (f"; not met: {', '.join(fails)}" if fails else ""))
    if device.type == "cpu":
        for goal, bound in (("goal_cpu_default_not_slower_than_fastest_baseline", 1.0),
                            ("target_cpu_default_1_3x_fastest_baseline", 1.3)):
            fails = [cell(r) for r in rows if r["ratio_fastest_baseline_over_default"] < bound]
            summary[goal] = {"met": len(rows) - len(fails), "cells": len(rows), "failed": fails}
            print(f"speed (CPU) default path >= {bound}x fastest baseline: met in {len(rows) - len(fails)}/{len(rows)} "
                  "cells" + (f"; not met: {', '.join(fails)}" if fails else ""))
    elif "higher" in args.baselines:
        big = [r for r in rows if r["meta_batch"] == 32]
        fails = [cell(r) for r in big if r["ratio_baseline_over_default"]["higher"] < 3.0]
        summary["goal_gpu_3x_higher_at_meta_batch_32"] = {
            "met": len(big) - len(fails), "cells": len(big), "failed": fails}
        print(f"\ngoal (GPU) default path >= 3x higher at meta-batch 32: met in {len(big) - len(fails)}/{len(big)} "
              "cells" + (f"; not met: {', '.join(fails)}" if fails else "") + ("" if big else " (none measured)"))
    return summary


def default_error_rows(run, args) -> list[dict[str, Any]]:
    """Per algorithm of ``--defaults`` and path: float32-vs-float64 errors at its defaults (module docstring)."""
    from bilevel import build_algorithm
    from bilevel.testing import default_config, float32_errors

    if args.example_plugins:
        import sys
        from pathlib import Path

        from bilevel.algorithm import register

        examples = Path(__file__).resolve().parents[1] / "examples"
        sys.path[:0] = [str(examples / "reptile_plugin"), str(examples)]
        import boil
        import protomaml
        import reptile_plugin

        register("reptile")(reptile_plugin.Reptile)
        register("boil")(boil.BOIL)
        register("protomaml")(protomaml.ProtoMAML)
    batch = cell_batches(run, args, ERROR_TASKS, 1)[0]
    tasks = [batch.task(i) for i in range(ERROR_TASKS)]
    rows = []
    for name in args.defaults:
        config = {**default_config(name), **({"noise": 0.0} if name == "entropy_sgd" else {})}
        algo = build_algorithm(config, run.model)
        params = algo.meta_parameters({k: v.to(run.device) for k, v in run.model.init_params().items()})
        errors, _ = float32_errors(algo, params, tasks)
        for path, (raw, matched) in errors.items():
            rows.append({"algorithm": name, "path": path, "raw_per_task": raw, "matched_per_task": matched,
                         "raw_median": statistics.median(raw), "raw_max": max(raw),
                         "matched_median": statistics.median(matched), "matched_max": max(matched)})
            print(f"[{name} {path}] raw {rows[-1]['raw_median']:.2e}, matched {rows[-1]['matched_median']:.2e}",
                  flush=True)
    print(f"\nfloat32 error vs float64 at each algorithm's defaults ({ERROR_TASKS} tasks, 1-shot, "
          f"{args.queries} queries)")
    print_table(["algorithm", "path", "raw median", "raw max", "matched median", "matched max"],
                [[r["algorithm"], r["path"], r["raw_median"], r["raw_max"], r["matched_median"], r["matched_max"]]
                 for r in rows])
    return rows


def main() -> None:
    args = parse_args()
    run = start(args)
    device, model = run.device, run.model
    if args.defaults:
        finish(run.env, default_error_rows(run, args), {}, args)
        return
    rows = []
    for shots, tasks in itertools.product(args.shots, args.meta_batch):
        batches = cell_batches(run, args, tasks, shots)
        for adapt, order, steps in itertools.product(args.adapt, args.order, args.steps):
            params = {k: v.to(device) for k, v in model.init_params().items()}
            row = run_cell(model, params, batches, adapt, order, steps, args, device)
            rows.append(row)
            times = ", ".join(f"{n} {r['median_s'] * 1e3:.0f}" for n, r in row["methods"].items())
            print(f"[{adapt} {order} {shots}-shot K={steps} T={tasks}] ms: {times}  "
                  f"(repeats {len(next(iter(row['methods'].values()))['times_s'])})", flush=True)
    summary = report(rows, args, device)
    finish(run.env, rows, summary, args)


if __name__ == "__main__":
    main()
