"""Peak memory and time of one second-order meta-gradient per method, against the inner steps.

Methods: this project's MAML with ``memory=store`` and ``memory=recompute`` (and any
``recompute:K`` given with ``--memories``) on each execution path of ``adapt=all`` (vmap, loop),
a per-task ``higher`` loop and a plain ``torch.autograd`` loop (``meta_step.py``'s baselines);
backbones ``conv4`` (1×28×28) and ``resnet12`` (3×84×84, where this checkout has it).

* **Peak memory.** CPU: every (backbone, steps, method) cell runs in a fresh process, which
  builds the model and the batch, reads its resident set (``VmRSS``; the high-water mark is reset
  through ``/proc/self/clear_refs`` where the kernel allows), takes one meta-gradient and reads
  its resident high-water mark (``VmHWM``): the peak above that baseline. With ``--live``, the
  peak bytes of live tensor storage instead (``live_bytes.py``): what the algorithm holds, without
  what the allocator keeps mapped. CUDA: the growth of ``torch.cuda.max_memory_allocated`` over one
  meta-gradient in the same kind of fresh process.
* **Time.** One process per (backbone, steps) runs every method once (warm-up), then in
  round-robin order (``common.py``), so a shared machine slows all methods alike; ratios are
  to ``store`` on the same path in the same run.

    PYTHONPATH=. python benchmarks/memory.py --threads 1 --out benchmarks/results/memory_cpu.json
    PYTHONPATH=. python benchmarks/memory.py --backbones resnet12 --shots 1 --meta-batch 2 --steps 1 5
    PYTHONPATH=. python benchmarks/memory.py --quick          # conv4, steps 1 and 5, no timing repeats
    PYTHONPATH=. python benchmarks/memory.py --backbones conv4 --steps 1 5 10 --no-time --baselines --live
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import add_common_args, finish, fresh_process_cell, print_table, start, time_methods

BACKBONES = {"conv4": (1, 28, 28), "resnet12": (3, 84, 84)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--backbones", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps; default 1 5 10 20")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--order", default="SO", choices=("SO", "FO"))
    parser.add_argument("--paths", nargs="+", default=["loop", "vmap"])
    parser.add_argument("--memories", nargs="+", default=["store", "recompute"])
    parser.add_argument("--baselines", nargs="*", default=["higher", "autograd"], choices=("higher", "autograd"))
    parser.add_argument("--no-time", action="store_true", help="peaks only")
    parser.add_argument("--live", action="store_true",
                        help="CPU: peak bytes of live tensors (live_bytes.py), not the resident high-water mark")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # a child process's cell (JSON)
    args = parser.parse_args()
    args.steps = args.steps or ([1, 5] if args.quick else [1, 5, 10, 20])
    return args


def methods_of(args: argparse.Namespace) -> list[str]:
    ours = [f"{memory}:{path}" for path in args.paths for memory in args.memories]
    return ours + list(args.baselines)


def build(args: argparse.Namespace, backbone: str, steps: int, device, dtype) -> tuple[Any, dict, Any]:
    """The model, its parameters and one batch of a cell (seeded)."""
    import torch

    from bilevel import ModelConfig, build_model
    from common import make_batch

    shape = BACKBONES[backbone]
    torch.manual_seed(args.seed)
    model = build_model(ModelConfig(name=backbone), shape, args.ways).to(device, dtype)
    params = {k: v.to(device) for k, v in model.init_params().items()}
    generator = torch.Generator().manual_seed(args.seed)
    batch = make_batch(args.meta_batch, args.ways, args.shots, args.queries, shape, device, dtype, generator)
    return model, params, batch


def grads_fn(method: str, model, params: dict, steps: int, order: str):
    """A zero-argument meta-gradient of ``method`` on a batch: ``fn(batch)``."""
    from meta_step import AutogradLoop, HigherLoop

    from bilevel import build_algorithm
    from common import INNER_LR, ORDERS

    if method in ("higher", "autograd"):
        loop = (HigherLoop if method == "higher" else AutogradLoop)(model, params, "all", ORDERS[order], steps)
        return loop.grads
    memory, _, path = method.rpartition(":")
    algo = build_algorithm({"name": "maml", "inner_steps": steps, "inner_lr": INNER_LR, "order": ORDERS[order],
                            "adapt": "all"}, model).with_execution(path).with_memory(memory)
    return lambda batch: algo.meta_grad(params, batch).grad


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_high_water_mark() -> bool:
    """Reset this process's ``VmHWM`` to its current resident set; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_cell(args: argparse.Namespace) -> None:
    """Child process: one meta-gradient of one cell; prints its peak as JSON."""
    import gc

    import torch

    from bilevel.execution.allocator import ensure_allocator
    from common import setup_torch

    ensure_allocator(args.malloc)
    cell = json.loads(args.cell)
    device, dtype = setup_torch(args)
    model, params, batch = build(args, cell["backbone"], cell["steps"], device, dtype)
    fn = grads_fn(cell["method"], model, params, cell["steps"], args.order)
    gc.collect()
    if args.live and device.type != "cuda":
        from live_bytes import LiveTensorBytes

        with LiveTensorBytes() as live:
            fn(batch)
        print(json.dumps({"peak_bytes": live.peak, "baseline_bytes": 0}))
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset = reset_high_water_mark()
        base = status_bytes("VmRSS") if reset else status_bytes("VmHWM")
    fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = status_bytes("VmHWM") - base
    print(json.dumps({"peak_bytes": peak, "baseline_bytes": base}))


def child_peak(args: argparse.Namespace, cell: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure_cell` in a fresh interpreter (same options)."""
    return fresh_process_cell(__file__, [a for a in sys.argv[1:] if a != "--quick"], cell)


def time_cell(args: argparse.Namespace, backbone: str, steps: int, run) -> dict[str, Any]:
    """Round-robin timing of every method on the same two batches (common.time_methods)."""
    model, params, batch = build(args, backbone, steps, run.device, run.dtype)
    fns = {m: grads_fn(m, model, params, steps, args.order) for m in methods_of(args)}
    calls = {m: (lambda f=f: f(batch)) for m, f in fns.items()}
    _, records = time_methods(calls, calls, run.device, args)
    return records


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.cell is not None:
        measure_cell(args)
        return
    run = start(args, note=f", {args.ways}-way {args.shots}-shot, {args.queries} queries, meta-batch "
                           f"{args.meta_batch}, {args.order}")
    from bilevel.primitives.models import MODELS

    rows = []
    for backbone in args.backbones:
        if backbone not in MODELS:
            print(f"skipping {backbone}: this checkout has no model={backbone} (models: {', '.join(MODELS)})")
            continue
        for steps in args.steps:
            peaks = {m: child_peak(args, {"backbone": backbone, "steps": steps, "method": m})["peak_bytes"]
                     for m in methods_of(args)}
            times = {} if args.no_time else time_cell(args, backbone, steps, run)
            rows.append({"backbone": backbone, "steps": steps, "peak_bytes": peaks,
                         "median_s": {m: r["median_s"] for m, r in times.items()}, "timing": times})
            print(f"[{backbone} K={steps}] peak MB: "
                  + ", ".join(f"{m} {p / 2**20:.0f}" for m, p in peaks.items()), flush=True)
    summary = report(rows, args)
    finish(run.env, rows, summary, args)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The table (peak MB and time relative to ``store`` on the same path) and the growth per step."""
    methods = methods_of(args)
    header = ["backbone", "K"] + [f"{m} MB" for m in methods] + [f"{m} t/store" for m in methods if ":" in m]
    lines = []
    for r in rows:
        line: list[Any] = [r["backbone"], r["steps"]] + [r["peak_bytes"][m] / 2**20 for m in methods]
        for m in methods:
            if ":" in m and r["median_s"]:
                line.append(r["median_s"][m] / r["median_s"]["store:" + m.rpartition(":")[2]])
            elif ":" in m:
                line.append(None)
        lines.append(line)
    print_table(header, lines)
    summary: dict[str, Any] = {"growth_mb_per_step": {}}
    for backbone in {r["backbone"] for r in rows}:
        cells = sorted((r for r in rows if r["backbone"] == backbone), key=lambda r: r["steps"])
        if len(cells) > 1:
            first, last = cells[0], cells[-1]
            span = last["steps"] - first["steps"]
            summary["growth_mb_per_step"][backbone] = {
                m: (last["peak_bytes"][m] - first["peak_bytes"][m]) / span / 2**20 for m in methods}
    print("growth per inner step (MB):", json.dumps(summary["growth_mb_per_step"], indent=None))
    return summary


if __name__ == "__main__":
    main()
