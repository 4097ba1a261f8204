"""One run over several processes: seconds per meta-step, tasks/s and the collective's share, and
the agreement of the parameters with one process.

**Timing** (default). The trainer's own step, built by ``bilevel.app.setup.setup``: conv4 on glyphs
(the default run's tasks: 5-way 1-shot, 5 queries per class; one inner step, ``execution=loop``, the
zeroing head), each process
drawing its share of every meta-batch, then ``Ablation.step`` + ``Replicas.reduce_step`` (one
``all_reduce``) + Adam. Grid: meta-batch 8/16/32 × SO/FO. Configurations (``--configs``,
``PROCESSESxTHREADS``): on the CPU ``1x2`` (one process, two threads) and ``2x1`` (two processes of
one thread, gloo); with ``--device cuda``, ``1x1`` … ``Nx1``, one GPU per process (NCCL). Each
configuration is one launch (``torchrun`` for several processes) that runs every cell: one warm-up
step, then ``--repeats`` timed steps. Reported: the median seconds per step on rank 0, tasks/s
(meta-batch / seconds), the share of the step spent inside the collective (wall time in
``all_reduce``, which includes waiting for the slower process) and the collective's own cost (one
``all_reduce`` of the step's buffer right after a barrier).

**Agreement** (``--agreement``). 20-step runs of ``bilevel-train`` (MAML SO on the loop path,
iMAML, Entropy-SGD on MLP/synthetic; MAML on conv4/glyphs) on 1, 2 and 4 processes, float64 and
float32; reported after the last step: ``‖p₁ − p_N‖ / ‖p₁‖`` over all parameters, its maximum
over the parameter tensors, and that maximum without the convolution biases that BatchNorm cancels
(their gradient is zero in exact arithmetic, so Adam's normalised steps make them round-off).

    PYTHONPATH=. python benchmarks/distributed.py --out distributed_cpu.json
    PYTHONPATH=. python benchmarks/distributed.py --agreement --out distributed_agreement.json
    PYTHONPATH=. python benchmarks/distributed.py --device cuda --configs 1x1 2x1 4x1 8x1
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ORDERS = {"SO": "maml", "FO": "fomaml"}
TIMING_OVERRIDES = ["model=conv4", "data=glyphs", "algorithm.inner_steps=1", "execution=loop", "eval.tasks=8",
                    "eval.final_tasks=8", "dist.timeout_s=600"]
SMALL = ["data=synthetic", "model=mlp", "model.hidden=16", "data.synthetic_dim=8", "train.meta_batch=8",
         "eval.tasks=8", "eval.final_tasks=8", "train.eval_every=20", "train.decompose_every=5"]
AGREEMENT = {
    "maml SO, mlp": SMALL + ["algorithm=maml"],
    "imaml, mlp": SMALL + ["algorithm=imaml", "algorithm.inner_steps=2", "algorithm.cg_iters=2", "algorithm.test_steps=1"],
    "entropy_sgd, mlp": SMALL + ["algorithm=entropy_sgd", "algorithm.inner_steps=2", "algorithm.test_steps=1"],
    "maml SO, conv4 glyphs": ["algorithm=maml", "train.meta_batch=8", "eval.tasks=8", "eval.final_tasks=8",
                              "train.eval_every=20", "train.decompose_every=5"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", nargs="+", default=None, help="PROCESSESxTHREADS (default: 1x2 2x1 on cpu)")
    parser.add_argument("--meta-batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--order", nargs="+", default=["SO", "FO"], choices=tuple(ORDERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--agreement", action="store_true", help="measure parameter agreement instead of time")
    parser.add_argument("--steps", type=int, default=20, help="--agreement: steps per run")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="--agreement: process counts")
    parser.add_argument("--out", default=None, help="write the measurements to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a launched process: its result file
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = args.configs or (["1x2", "2x1"] if args.device == "cpu" else ["1x1"])
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, threads: int, program: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``program`` (python arguments) on ``processes`` processes of ``threads`` threads each:
    directly for one, under ``torchrun`` on 127.0.0.1 for several."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), BILEVEL_ALLOCATOR="default")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    runner = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}"]
    if processes > 1 and program[0] == "-m":
        runner.append("-m")
        program = program[1:]
    result = subprocess.run(runner + program, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(runner + program)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose, initialize_config_module

    from bilevel.app.config.schema import register_configs

    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def bare_all_reduce(run: Any, repeats: int = 5) -> float:
    """Median seconds of one ``all_reduce`` of a plain step's buffer (gradient, loss, accuracy and
    the stop slot per process) right after a barrier: the collective's own cost, without waiting."""
    import torch
    import torch.distributed as dist

    size = sum(p.numel() for p in run.params.values()) + 2 + run.replicas.launch.world
    flat = torch.zeros(size, dtype=run.dtype, device=run.device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    """One process of a timing launch: every cell of the grid, in one process group."""
    import torch

    from bilevel.app.head_policy import before_outer_step
    from bilevel.app.lifecycle.signals import GracefulStop
    from bilevel.app.setup import setup

    torch.set_num_threads(args.threads)
    cells = [(m, order) for order in args.order for m in args.meta_batch]

    def build(m: int, order: str):
        return setup(compose(TIMING_OVERRIDES + [f"algorithm={ORDERS[order]}", f"train.meta_batch={m}",
                                                 f"device={args.device}", f"dtype={args.dtype}"]))

    rows = []
    first = build(*cells[0])
    with tempfile.TemporaryDirectory() as tmp, first.replicas.running(tmp):
        for m, order in cells:
            run = build(m, order)
            optimizer = run.algorithm.make_outer_optimizer(list(run.params.values()), run.cfg.train.lr)
            stop = GracefulStop()  # never entered: no signal, as in an uninterrupted run
            seconds, collective = [], []
            for i in range(1 + args.repeats):
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                start, before = time.perf_counter(), run.replicas.collective_seconds
                batch = run.sampler.sample().to(run.device, run.dtype)
                before_outer_step(run.params, run.cfg.head.policy)
                result = run.ablation.step(run.algorithm, run.params, batch, False)
                result, _ = run.replicas.reduce_step(result, batch, stop)
                for k, p in run.params.items():
                    p.grad = result.grad[k]
                optimizer.step()
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                if i:
                    seconds.append(time.perf_counter() - start)
                    collective.append(run.replicas.collective_seconds - before)
            step = statistics.median(seconds)
            rows.append({"meta_batch": m, "order": order, "seconds": seconds, "collective_seconds": collective,
                         "median_s": step, "tasks_per_s": m / step,
                         "collective_share": statistics.median(c / s for c, s in zip(collective, seconds)),
                         "all_reduce_s": bare_all_reduce(run) if run.replicas.launch.distributed else 0.0,
                         "tasks_here": batch.num_tasks})
    if first.replicas.launch.writer:
        Path(args.worker).write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads()}))


def environment() -> dict[str, Any]:
    import torch

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def timing(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    results = []
    for config in args.configs:
        processes, threads = (int(x) for x in config.split("x"))
        out = tmp / f"{config}.json"
        program = [str(Path(__file__).resolve()), "--worker", str(out), "--threads", str(threads),
                   "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
                   "--meta-batch", *map(str, args.meta_batch), "--order", *args.order]
        launch(processes, threads, program, tmp)
        measured = json.loads(out.read_text())
        results += [{"config": config, "processes": processes, "threads": measured["threads"], **row}
                    for row in measured["rows"]]
    print(f"\n{'order':>5} {'T':>3} " + "".join(f"{c + ' s/step':>14} {'tasks/s':>8} {'coll.':>6}" for c in args.configs)
          + (f" {'speed-up':>9}" if len(args.configs) > 1 else "") + f" {'all_reduce':>11}")
    for order in args.order:
        for m in args.meta_batch:
            cells = [next(r for r in results if r["config"] == c and r["order"] == order and r["meta_batch"] == m)
                     for c in args.configs]
            line = f"{order:>5} {m:>3} " + "".join(
                f"{r['median_s']:>14.3f} {r['tasks_per_s']:>8.1f} {100 * r['collective_share']:>5.1f}%" for r in cells)
            if len(cells) > 1:
                line += f" {cells[0]['median_s'] / cells[-1]['median_s']:>9.2f}"
            print(line + f" {1e3 * cells[-1]['all_reduce_s']:>8.2f} ms")
    return results


def params_of(run_dir: Path) -> dict[str, Any]:
    from bilevel.app.lifecycle.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoint.pt")["params"]


def agreement(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name, overrides in AGREEMENT.items():
        for dtype in ("float64", "float32"):
            dirs = {}
            for world in args.worlds:
                dirs[world] = tmp / f"{name}-{dtype}-{world}".replace(" ", "_").replace(",", "")
                launch(world, 1, ["-m", "bilevel.app.train", *overrides, f"dtype={dtype}", f"train.steps={args.steps}",
                                  "device=cpu", "execution=loop", f"hydra.run.dir={dirs[world]}"], tmp)
            reference = params_of(dirs[args.worlds[0]])
            for world in args.worlds[1:]:
                other = params_of(dirs[world])
                per_tensor = {k: float((other[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-300))
                              for k in reference}
                whole = float(sum((other[k] - reference[k]).pow(2).sum() for k in reference).sqrt()
                              / sum(reference[k].pow(2).sum() for k in reference).sqrt())
                # A convolution's bias followed by BatchNorm has a zero gradient in exact arithmetic: Adam
                # turns its round-off into steps of size lr, so its value is round-off, whatever the order.
                kept = [d for k, d in per_tensor.items() if not k.endswith("conv.bias")]
                rows.append({"run": name, "dtype": dtype, "processes": world, "per_tensor": per_tensor,
                             "whole": whole, "max_tensor": max(per_tensor.values()), "max_tensor_but_conv_bias": max(kept)})
                print(f"{name:>24} {dtype:>8} {args.worlds[0]} vs {world}: all parameters {whole:.1e}, worst tensor "
                      f"{max(per_tensor.values()):.1e}, worst but BatchNorm-cancelled conv biases {max(kept):.1e}")
    return rows


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        rows = agreement(args, Path(tmp)) if args.agreement else timing(args, Path(tmp))
    env["loadavg_end"] = os.getloadavg()
    print(f"load average at start {env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f} "
          f"(on {env['cpu_count']} CPUs)")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
