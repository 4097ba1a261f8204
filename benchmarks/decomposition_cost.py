"""Cost of the decomposition: a meta-step with ``meta_grad(..., decompose=True)`` against one without.

Ablation training needs the terms at every step, so the decomposition's cost is paid per
meta-step. For MAML, every cell of the grid times, on each execution path and in the same
run (round-robin, see ``common.py``), a plain meta-step (meta-gradient + Adam) and a
decomposed one; the ratio is ``decomposed / plain``. Goals: ≤ 1.5 for head-only inner
loops, ≤ 2 for full-network second order (no goal is set for full-network first order).
The *default path* is the one ``execution=auto`` picks (fastest plain step of the cell).

Every other registered algorithm (``bilevel.available_algorithms()``: iMAML, Entropy-SGD,
any plugin) gets rows built from its ``Config``: the grid's ``adapt``/``order``/``inner_steps``
where the plugin has those fields, its defaults otherwise. Each such row also times MAML's
plain meta-step at the same inner-step budget (``algo.train_steps``; same ``adapt``; same
``order`` when the plugin has one, else second order) and reports ``plugin / MAML``.
A plugin that fails to build or run gets a row with its error instead of stopping the run.

    PYTHONPATH=. python benchmarks/decomposition_cost.py --out decomposition_cost.json
    PYTHONPATH=. python benchmarks/decomposition_cost.py --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
from typing import Any

from common import (
    INNER_LR, ORDERS, EngineStep, add_common_args, cell_batches, cycling_steps, finish, parse_grid_args,
    print_table, start, time_methods,
)
GOALS = {("head", "SO"): 1.5, ("head", "FO"): 1.5, ("all", "SO"): 2.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--algorithms", nargs="*", default=None,
                        help="plugins besides MAML to include (default: every registered one)")
    return parse_grid_args(parser, (4, 16), ("head", "all"))


def plain_and_decomposed(prefix: str, algo, params) -> dict[str, EngineStep]:
    """``{prefix:path:plain, prefix:path:decomposed, prefix:path:ablated}`` for every execution
    path of ``algo``; ``ablated`` is the ablation-training step keeping the contrastive term."""
    methods = {}
    for path in algo.executions:
        methods[f"{prefix}:{path}:plain"] = EngineStep(algo, path, params)
        methods[f"{prefix}:{path}:decomposed"] = EngineStep(algo, path, params, decompose=True)
        methods[f"{prefix}:{path}:ablated"] = EngineStep(algo, path, params, keep=("contrastive",))
    return methods


def ratios(records: dict[str, Any], prefix: str, paths) -> dict[str, Any]:
    """Per-path plain/decomposed seconds and ratio; the default path (fastest plain)."""
    per_path = {}
    for p in paths:
        plain = records[f"{prefix}:{p}:plain"]["median_s"]
        dec = records[f"{prefix}:{p}:decomposed"]["median_s"]
        abl = records[f"{prefix}:{p}:ablated"]["median_s"]
        per_path[p] = {"plain_s": plain, "decomposed_s": dec, "ratio": dec / plain,
                       "ablated_s": abl, "ablated_ratio": abl / plain}
    default = min(per_path, key=lambda p: per_path[p]["plain_s"])
    return {"paths": per_path, "default_path": default, "default_ratio": per_path[default]["ratio"],
            "default_ablated_ratio": per_path[default]["ablated_ratio"],
            "default_plain_s": per_path[default]["plain_s"]}


def plugin_configs(name: str, args) -> list[dict[str, Any]]:
    """The grid's values for the plugin's fields ``adapt``/``order``/``inner_steps`` (where present)."""
    from bilevel import get_algorithm

    fields = {f.name for f in dataclasses.fields(get_algorithm(name).Config)}
    axes = {"adapt": args.adapt, "order": [ORDERS[o] for o in args.order], "inner_steps": args.steps}
    present = {k: v for k, v in axes.items() if k in fields}
    return [{"name": name, **dict(zip(present, values))} for values in itertools.product(*present.values())]


def maml_cell(model, params, batches, adapt: str, order: str, steps: int, args, device) -> dict[str, Any]:
    from bilevel import build_algorithm

    algo = build_algorithm({"name": "maml", "adapt": adapt, "order": ORDERS[order], "inner_steps": steps,
                            "inner_lr": INNER_LR}, model)
    methods = plain_and_decomposed("maml", algo, params)
    warmups = {n: (lambda m=m: m.grads(batches[0])) for n, m in methods.items()}
    _, records = time_methods(warmups, cycling_steps(methods, batches), device, args)
    return {"algorithm": "maml", "adapt": adapt, "order": order, "inner_steps": steps,
            "goal": GOALS.get((adapt, order)), "methods": records, **ratios(records, "maml", algo.executions)}


def plugin_cell(model, params, batches, config: dict[str, Any], args, device) -> dict[str, Any]:
    from bilevel import build_algorithm

    row: dict[str, Any] = {"algorithm": config["name"], "config": config}
    try:
        algo = build_algorithm(config, model)
        budget = algo.train_steps
        adapt = getattr(algo.config, "adapt", "all")
        order = getattr(algo.config, "order", "second_order")
        maml = build_algorithm({"name": "maml", "adapt": adapt, "order": order, "inner_steps": budget,
                                "inner_lr": INNER_LR}, model)
        methods = plain_and_decomposed("plugin", algo, params)
        methods.update({f"maml:{p}:plain": EngineStep(maml, p, params) for p in maml.executions})
        warmups = {n: (lambda m=m: m.grads(batches[0])) for n, m in methods.items()}
        _, records = time_methods(warmups, cycling_steps(methods, batches), device, args)
    except Exception as err:  # a plugin under construction must not stop the benchmark
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    maml_default = min(records[f"maml:{p}:plain"]["median_s"] for p in maml.executions)
    short = {v: k for k, v in ORDERS.items()}
    row.update(adapt=adapt, order=short[order] if "order" in config else None, maml_order=short[order],
               inner_steps=budget, methods=records, maml_default_plain_s=maml_default,
               **ratios(records, "plugin", algo.executions))
    row["plain_over_maml"] = row["default_plain_s"] / maml_default
    return row


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    paths = ("vmap", "loop", "shared")
    maml = [r for r in rows if r["algorithm"] == "maml"]
    print("\nMAML: ms per meta-step plain -> decomposed (ratio); default = fastest plain path; "
          "'ablated' = the ablation-training step (kept terms only) at the default path")
    header = ["adapt", "ord", "shot", "K", "T", *paths, "default", "ratio", "ablated", "goal", "met"]
    lines = []
    for r in maml:
        cells = []
        for p in paths:
            got = r["paths"].get(p)
            cells.append(None if got is None else
                         f"{got['plain_s'] * 1e3:.0f}->{got['decomposed_s'] * 1e3:.0f} ({got['ratio']:.2f})")
        met = None if r["goal"] is None else ("yes" if r["default_ratio"] <= r["goal"] else "NO")
        lines.append([r["adapt"], r["order"], r["shots"], r["inner_steps"], r["meta_batch"], *cells,
                      r["default_path"], r["default_ratio"], r["default_ablated_ratio"], r["goal"], met])
    print_table(header, lines)
    summary: dict[str, Any] = {}
    goal_rows = [r for r in maml if r["goal"] is not None]
    if goal_rows:
        at_default = [r for r in goal_rows if r["default_ratio"] <= r["goal"]]
        every = [r for r in goal_rows if all(v["ratio"] <= r["goal"] for v in r["paths"].values())]
        summary["goal_decomposition_ratio"] = {"cells": len(goal_rows), "met_at_default_path": len(at_default),
                                               "met_on_every_path": len(every)}
        print(f"\ngoal (head <= 1.5x, all/SO <= 2x): met at the default path in {len(at_default)}/{len(goal_rows)} "
              f"cells, on every path in {len(every)}/{len(goal_rows)}")
    others = [r for r in rows if r["algorithm"] != "maml"]
    if others:
        print("\nother algorithms: default path plain / decomposed; plain cost vs MAML plain at the same budget")
        header = ["algorithm", "adapt", "ord", "shot", "K", "T", "default", "plain ms", "dec ms", "ratio",
                  "vs MAML", "MAML ord", "error"]
        lines = []
        for r in others:
            if "error" in r:
                lines.append([r["algorithm"], *([None] * 2), r["shots"], None, r["meta_batch"],
                              *([None] * 6), r["error"][:80]])
                continue
            d = r["paths"][r["default_path"]]
            lines.append([r["algorithm"], r["adapt"], r["order"], r["shots"], r["inner_steps"], r["meta_batch"],
                          r["default_path"], d["plain_s"] * 1e3, d["decomposed_s"] * 1e3, d["ratio"],
                          r["plain_over_maml"], r["maml_order"], None])
        print_table(header, lines)
    return summary


def main() -> None:
    args = parse_args()
    from bilevel import available_algorithms

    plugins = [a for a in (available_algorithms() if args.algorithms is None else args.algorithms) if a != "maml"]
    run = start(args, note=f", algorithms: {', '.join(['maml', *plugins])}")
    run.env["algorithms"] = ["maml", *plugins]
    device, model = run.device, run.model
    rows = []
    for shots, tasks in itertools.product(args.shots, args.meta_batch):
        batches = cell_batches(run, args, tasks, shots)
        params = {k: v.to(device) for k, v in model.init_params().items()}
        cell = {"shots": shots, "meta_batch": tasks}
        for adapt, order, steps in itertools.product(args.adapt, args.order, args.steps):
            row = {**cell, **maml_cell(model, params, batches, adapt, order, steps, args, device)}
            rows.append(row)
            print(f"[maml {adapt} {order} {shots}-shot K={steps} T={tasks}] " + ", ".join(
                f"{p} {v['ratio']:.2f}" for p, v in row["paths"].items()), flush=True)
        for name in plugins:
            for config in plugin_configs(name, args):
                row = {**cell, **plugin_cell(model, params, batches, config, args, device)}
                rows.append(row)
                print(f"[{config}] " + (row.get("error") or f"ratio {row['default_ratio']:.2f}, "
                                         f"vs MAML {row['plain_over_maml']:.2f}"), flush=True)
    summary = report(rows)
    finish(run.env, rows, summary, args)


if __name__ == "__main__":
    main()
