"""Peak memory and time of one inner step's second-order pullback: reverse-over-reverse against
forward-over-reverse.

``memory=recompute`` re-runs each inner step ``θ' = θ − α ∇L_S(θ)`` in the outer backward and pulls
the cotangent ``v`` through it; on the parameters that is ``v − α H v``, a Hessian-vector product
of the support loss. This script measures one such product, ``H v`` for the support set of one
task (``--ways``-way, ``--shots`` per class, cross-entropy of the whole model), computed as:

* ``grad``: one gradient ``∇L_S`` (the first-order cost, for scale);
* ``rr_func``: reverse-over-reverse with ``torch.func``, ``vjp(grad(L_S), θ)[1](v)`` (how the
  engine's ``vmap`` path and the decomposition pull back);
* ``rr_autograd``: reverse-over-reverse with plain autograd, ``autograd.grad`` of the
  ``create_graph`` gradient (the engine's per-task loop);
* ``fr_func``: forward-over-reverse, ``torch.func.jvp(grad(L_S), (θ,), (v,))`` (``H`` is symmetric).

Every mode uses PyTorch's native ``F.max_pool2d``: the engine's faster CPU max-pool
(:func:`bilevel.primitives.pooling.max_pool2x2`) is a custom ``autograd.Function`` without a
forward-mode rule, so ``jvp`` cannot pass through it.

* **Peak.** Every (backbone, mode) cell runs in a fresh process, which builds the model, the batch
  and ``v``, reads its resident set (``VmRSS``, the high-water mark reset through
  ``/proc/self/clear_refs``), runs one product and reads ``VmHWM``: the peak above that baseline.
* **Time.** The same process then runs the product ``--repeats`` more times: median wall and CPU
  seconds. Cells run one after the other, so on a shared machine the times are indicative only.
* **Agreement.** Each cell reports ``⟨H v, u⟩`` for a fixed random ``u``: the three products must agree.

    PYTHONPATH=. python benchmarks/hvp_modes.py --threads 1 --out benchmarks/results/hvp_modes_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import add_common_args, finish, fresh_process_cell, print_table, start
from memory import reset_high_water_mark, status_bytes

SHAPES = {"conv4": (1, 28, 28), "resnet12": (3, 84, 84)}
MODES = ("grad", "rr_func", "rr_autograd", "fr_func")
INNER_LR = 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--backbones", nargs="+", default=list(SHAPES), choices=tuple(SHAPES))
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 1], help="support images per class, one per backbone")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # a child process's cell (JSON)
    args = parser.parse_args()
    if len(args.shots) != len(args.backbones):
        parser.error(f"--shots needs one value per backbone ({len(args.backbones)}), got {len(args.shots)}")
    return args


def product(mode: str, model, params: dict, x, y, v: dict) -> Callable[[], dict]:
    """A zero-argument ``H v`` (or ``∇L_S`` for ``grad``) of the support loss (module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp, vjp

    def loss(p: dict):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def autograd_hvp() -> dict:
        leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
        g = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
        return dict(zip(leaves, torch.autograd.grad(g, list(leaves.values()), [v[k] for k in leaves])))

    calls = {
        "grad": lambda: grad(loss)(params),
        "rr_func": lambda: vjp(grad(loss), params)[1](v)[0],
        "rr_autograd": autograd_hvp,
        "fr_func": lambda: jvp(grad(loss), (params,), (v,))[1],
    }
    return calls[mode]


def native_pooling() -> None:
    """Every built-in encoder pools with ``F.max_pool2d`` (module docstring)."""
    import torch.nn.functional as F

    import bilevel.primitives.models as models
    import bilevel.primitives.resnet12 as resnet12

    models.pool2x2 = resnet12.pool2x2 = lambda x: F.max_pool2d(x, 2)


def measure_cell(args: argparse.Namespace) -> None:
    """Child process: the peak of one product, then its time; prints JSON."""
    import gc

    import torch

    from bilevel import ModelConfig, build_model
    from bilevel.execution.allocator import ensure_allocator
    from common import setup_torch

    ensure_allocator(args.malloc)
    cell = json.loads(args.cell)
    device, dtype = setup_torch(args)
    native_pooling()
    shape = SHAPES[cell["backbone"]]
    model = build_model(ModelConfig(name=cell["backbone"]), shape, args.ways).to(device, dtype)
    params = {k: t.to(device) for k, t in model.init_params().items()}
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.ways * cell["shots"], *shape, generator=generator).to(device, dtype)
    y = torch.arange(args.ways).repeat_interleave(cell["shots"]).to(device)
    v = {k: torch.randn(t.shape, generator=generator).to(device, dtype) for k, t in params.items()}
    u = {k: torch.randn(t.shape, generator=generator).to(device, dtype) for k, t in params.items()}
    call = product(cell["mode"], model, params, x, y, v)
    gc.collect()
    reset = reset_high_water_mark()
    base = status_bytes("VmRSS") if reset else status_bytes("VmHWM")
    out = call()
    peak = status_bytes("VmHWM") - base
    check = float(sum((out[k].double() * u[k].double()).sum() for k in out))
    wall, cpu = [], []
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    print(json.dumps({"peak_bytes": peak, "baseline_bytes": base, "check": check,
                      "median_wall_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu)}))


def child(args: argparse.Namespace, cell: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`measure_cell` in a fresh interpreter (same options)."""
    return fresh_process_cell(__file__, sys.argv[1:], cell)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.cell is not None:
        measure_cell(args)
        return
    run = start(args, note=f", {args.ways}-way, one task's support set, native max-pool")
    rows = []
    for backbone, shots in zip(args.backbones, args.shots):
        cells = {m: child(args, {"backbone": backbone, "shots": shots, "mode": m}) for m in args.modes}
        rows.append({"backbone": backbone, "shape": SHAPES[backbone], "shots": shots, "cells": cells})
        print(f"[{backbone}] " + ", ".join(f"{m} {c['peak_bytes'] / 2**20:.0f} MB {c['median_wall_s']:.2f} s"
                                           for m, c in cells.items()), flush=True)
    print_table(["backbone", "shots"] + [f"{m} MB" for m in args.modes] + [f"{m} s" for m in args.modes]
                + [f"{m} <Hv,u>" for m in args.modes],
                [[r["backbone"], r["shots"]] + [r["cells"][m]["peak_bytes"] / 2**20 for m in args.modes]
                 + [r["cells"][m]["median_wall_s"] for m in args.modes] + [r["cells"][m]["check"] for m in args.modes]
                 for r in rows])
    finish(run.env, rows, {}, args)


if __name__ == "__main__":
    main()
