"""Mixed precision (``precision=bf16|fp16``): meta-gradient error against float64 per algorithm and
execution path, the decomposition's identity, and the speed of bf16 (fp16) against fp32.

Cell (the default run's): conv4 (64 channels) on glyph tasks, 5-way 1-shot, 15 queries, zero head
(``head.policy=zeroing``), every built-in algorithm at its preset (``configs/algorithm/``;
Entropy-SGD with its noise set to 0 so that every precision follows the same chain). Error: the
median over ``--tasks`` tasks of ``‖g − g64‖ / ‖g64‖``, ``g64`` from the float64 engine on the same
path. For second-order MAML the table adds the two ways that fail: 16-bit forward values too
(``forward16``, the convolutions entirely in 16 bits) and a naive ``torch.autocast`` around the
whole meta-step. Identity: ``‖Σ terms − g‖ / ‖g‖`` of one decomposed task under the precision.
Speed: second-order MAML's meta-step (meta-batch ``--meta-batch``), every precision on every path
timed round-robin in the same run (``benchmarks/common.py``), reported as the ratio to fp32.

    python benchmarks/precision.py --out benchmarks/results/precision_cpu.json
    python benchmarks/precision.py --device cuda --precisions bf16 fp16 --out ...   # gpu_check.sh

fp16 on a CPU without native fp16 arithmetic runs torch's reference kernels (about 17× slower than
fp32 here): ``--precisions fp16`` measures it anyway; by default the CPU measures bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, finish, print_table, start, time_methods  # noqa: E402

ALGORITHMS = ("maml", "fomaml", "anil", "imaml", "entropy_sgd", "r2d2", "meta_sgd")
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "algorithm"


def preset(name: str) -> dict:
    """The algorithm node of ``configs/algorithm/<name>.yaml`` (Entropy-SGD without noise)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))["algorithm"]
    if node["name"] == "entropy_sgd":
        node["noise"] = 0.0
    return node


def run_scale(precision: str):
    """The loss scale a training run starts with under ``precision`` (fp16 only)."""
    from bilevel.app.loss_scale import DynamicLossScale

    return DynamicLossScale() if precision == "fp16" else None


def contexts(precisions, name: str, device) -> dict:
    """The precision settings measured for algorithm ``name``: label → context factory."""
    import torch

    from bilevel.primitives.precision import Policy, mixed_precision

    out = {"fp32": contextlib.nullcontext}
    for p in precisions:
        out[p] = lambda p=p: mixed_precision(p, run_scale(p))
    if name == "maml":
        low = precisions[0]
        out[f"{low} forward16"] = lambda: mixed_precision(Policy(low, forward16=True))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[low]
        out[f"{low} autocast"] = lambda: torch.autocast(device.type, dtype=dtype)
    return out


def measure_errors(run, args, tasks, name: str) -> list[dict]:
    """Rows ``{algorithm, path, precision, error, max_error, identity}`` of one algorithm."""
    import torch

    from bilevel import build_algorithm
    from bilevel.testing import rel_err

    algo = build_algorithm(preset(name), run.model)
    params = algo.meta_parameters(dict(run.params))  # Meta-SGD adds its learning rates
    model64 = copy.deepcopy(run.model).double()
    params64 = {k: v.double() for k, v in params.items()}
    rows = []
    for path in algo.executions:
        algo_p, algo64 = algo.with_execution(path), build_algorithm(preset(name), model64, path)
        exact = [algo64.meta_grad(params64, t.to(dtype=torch.float64)).grad for t in tasks]
        for label, context in contexts(args.precisions, name, run.device).items():
            with context():
                grads = [algo_p.meta_grad(params, t).grad for t in tasks]
                identity = None
                if algo.terms and " " not in label:
                    identity = float(algo_p.meta_grad(params, tasks[0], decompose=True).decomposition.identity_error)
            errors = [rel_err({k: v.double() for k, v in g.items()}, e) for g, e in zip(grads, exact)]
            finite = all(all(torch.isfinite(v).all() for v in g.values()) for g in grads)
            rows.append({"algorithm": name, "path": path, "precision": label, "finite": finite,
                         "error": statistics.median(errors), "max_error": max(errors), "identity": identity})
    return rows


def measure_speed(run, args) -> list[dict]:
    """Seconds per second-order MAML meta-step, every precision on every path, interleaved."""
    from bilevel import build_algorithm
    from bilevel.data import build_sampler
    from bilevel.data.config import DataConfig
    from bilevel.primitives.precision import mixed_precision

    batch = build_sampler(DataConfig(queries=args.queries), "train", args.meta_batch, seed=args.seed + 1).sample()
    batch = batch.to(run.device, run.dtype)
    algo = build_algorithm(preset("maml"), run.model)
    steps = {}
    for path in algo.executions:
        for p in ("fp32", *args.precisions):
            def step(a=algo.with_execution(path), p=p):
                with mixed_precision(p, run_scale(p)):
                    return a.meta_grad(run.params, batch).grad
            steps[(path, p)] = step
    _, records = time_methods(steps, steps, run.device, args)
    rows = []
    for (path, p), rec in records.items():
        base = records[(path, "fp32")]["median_s"]
        rows.append({"path": path, "precision": p, "median_s": rec["median_s"], "ratio_to_fp32": rec["median_s"] / base,
                     "times_s": rec["times_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per error median")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per timed meta-step")
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=("bf16", "fp16"))
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.algorithms = 2, ["maml"]
    run = start(args)
    import torch

    from bilevel.data import build_sampler
    from bilevel.data.config import DataConfig

    run.params = run.model.init_params()
    run.params["head.weight"] = torch.zeros_like(run.params["head.weight"])
    run.params["head.bias"] = torch.zeros_like(run.params["head.bias"])
    batch = build_sampler(DataConfig(queries=args.queries), "train", args.tasks, seed=args.seed).sample()
    tasks = [batch.to(run.device, run.dtype).task(i) for i in range(args.tasks)]
    errors = []
    for name in args.algorithms:
        errors += measure_errors(run, args, tasks, name)
        print_table(["algorithm", "path", "precision", "median error", "max error", "identity"],
                    [[r["algorithm"], r["path"], r["precision"], r["error"], r["max_error"], r["identity"]]
                     for r in errors if r["algorithm"] == name])
    speed = measure_speed(run, args)
    print_table(["path", "precision", "s / meta-step", "ratio to fp32"],
                [[r["path"], r["precision"], r["median_s"], r["ratio_to_fp32"]] for r in speed])
    finish(run.env, errors, {"speed": speed}, args)


if __name__ == "__main__":
    main()
