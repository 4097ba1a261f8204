"""Shared machinery of the benchmark scripts: allocator set-up, batches, interleaved timing,
environment record, tables and JSON output.

Timing protocol (``median_s`` is wall time, or this process's CPU time with ``--clock cpu``):
every method of one grid cell is first run once (warm-up, and the run whose gradient the
scripts compare across methods), then the methods are run in
round-robin order ``n`` times and each one's *median* is reported. Round-robin
spreads slow phases of a shared machine over all methods of the cell instead of over one.
``n = clamp(round(target_s / slowest warm-up), min_repeats, repeats)``, so big cells get
fewer repeats and the whole grid stays within a predictable time. On CUDA every timed call
ends with ``torch.cuda.synchronize()`` and the peak of ``torch.cuda.max_memory_allocated``
over its calls is recorded; on CPU the minor page faults per call are recorded instead (the
allocator's signature, see :func:`ensure_allocator`).

This module imports nothing heavy at module level: :func:`ensure_allocator` must run (and
may re-exec the interpreter) before torch allocates anything.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from bilevel.execution.allocator import ALLOCATORS, ensure_allocator
from bilevel.execution.mapping import synchronize

if TYPE_CHECKING:
    from bilevel.data.batch import TaskBatch

OUTER_LR = 1e-3
ORDERS = {"SO": "second_order", "FO": "first_order"}
SHAPE = (1, 28, 28)
INNER_LR = 0.4


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark script takes."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--quick", action="store_true", help="reduced grid (to validate the script)")
    parser.add_argument("--repeats", type=int, default=5, help="most timed runs per method and cell")
    parser.add_argument("--min-repeats", type=int, default=1, help="fewest timed runs per method and cell")
    parser.add_argument("--target-s", type=float, default=2.0,
                        help="aim for about this many seconds of timed runs per method and cell")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--malloc", default="retain", choices=ALLOCATORS,
                        help="glibc malloc configuration (the script re-execs itself to apply it)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="what the medians and ratios use: wall time, or this process's CPU time "
                             "(robust to other jobs on a shared machine; use with --threads 1)")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: allow TF32 in matmuls and cuDNN convolutions (its accuracy cost shows in "
                             "the error-vs-float64 columns)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="CUDA: torch.backends.cudnn.benchmark=True")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write all measurements to this JSON file")


def parse_grid_args(parser: argparse.ArgumentParser, meta_batches: Sequence[int],
                    adapt: Sequence[str]) -> argparse.Namespace:
    """Add the grid options both scripts share (5-way conv4 cells), parse the command line and
    fill the grid's defaults: 1 and 5 shots and inner steps, ``meta_batches`` (``--quick``: the
    first cell only)."""
    batches = " ".join(map(str, meta_batches))
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15, help="query images per class")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="default 1 5 (quick: 1)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps; default 1 5 (quick: 1)")
    parser.add_argument("--meta-batch", type=int, nargs="+", default=None, help=f"default {batches} (quick: 4)")
    parser.add_argument("--order", nargs="+", default=["SO", "FO"], choices=tuple(ORDERS))
    parser.add_argument("--adapt", nargs="+", default=list(adapt), choices=("all", "head"))
    args = parser.parse_args()
    args.shots = args.shots or ([1] if args.quick else [1, 5])
    args.steps = args.steps or ([1] if args.quick else [1, 5])
    args.meta_batch = args.meta_batch or ([4] if args.quick else list(meta_batches))
    return args


def setup_torch(args: argparse.Namespace) -> tuple[Any, Any]:
    """Seed, threads; returns ``(device, dtype)``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    return device, getattr(torch, args.dtype)


def make_batch(tasks: int, ways: int, shots: int, queries: int, shape: Sequence[int], device, dtype,
               generator) -> TaskBatch:
    """A meta-batch of Gaussian images with labels ``0..ways-1`` (``shots``/``queries`` per class)."""
    import torch

    from bilevel.testing import labelled_batch

    def draw(per_class: int):
        x = torch.randn(tasks, ways * per_class, *shape, generator=generator).to(device, dtype)
        y = torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1).to(device)
        return x, y

    support_x, support_y = draw(shots)
    query_x, query_y = draw(queries)
    return labelled_batch(support_x, support_y, query_x, query_y, ways)


def _call(fn: Callable[[], Any], device) -> tuple[float, float, int, int | None]:
    """Wall seconds, process CPU seconds, minor page faults and CUDA peak bytes of one call."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds, cpu, faults, torch.cuda.max_memory_allocated(device) if cuda else None


def time_methods(warmups: dict[str, Callable[[], Any]], steps: dict[str, Callable[[], Any]], device,
                 args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Warm up every method (returning what its warm-up returned), then time ``steps`` in
    round-robin order. Returns ``(warm-up results, {method: timing record})``."""
    results, warm_seconds = {}, {}
    for name, fn in warmups.items():
        synchronize(device)
        start = time.perf_counter()
        results[name] = fn()
        synchronize(device)
        warm_seconds[name] = time.perf_counter() - start
    slowest = max(warm_seconds.values())
    n = max(args.min_repeats, min(args.repeats, round(args.target_s / max(slowest, 1e-9))))
    calls: dict[str, list[tuple[float, float, int, int | None]]] = {name: [] for name in steps}
    for _ in range(n):
        for name, fn in steps.items():
            calls[name].append(_call(fn, device))
    records = {}
    for name, got in calls.items():
        wall, cpu = [c[0] for c in got], [c[1] for c in got]
        peaks = [c[3] for c in got if c[3] is not None]
        records[name] = {
            "median_s": statistics.median(cpu if args.clock == "cpu" else wall),
            "median_wall_s": statistics.median(wall),
            "median_cpu_s": statistics.median(cpu),
            "times_s": wall,
            "cpu_times_s": cpu,
            "warmup_s": warm_seconds.get(name),
            "minor_faults_per_step": statistics.median(c[2] for c in got),
            "peak_bytes": max(peaks) if peaks else None,
        }
    return results, records


class EngineStep:
    """A meta-step of this project's algorithm on one execution path:
    ``algo.meta_grad(params, batch, decompose)`` (or, with ``keep``, the ablation step
    ``algo.ablated_meta_grad(params, batch, keep)``) and an Adam step with its ``grad``."""

    def __init__(self, algo, path: str, params: dict, decompose: bool = False, keep: tuple | None = None) -> None:
        import torch

        self.algo, self.path, self.decompose, self.keep = algo.with_execution(path), path, decompose, keep
        self.params = {k: v.clone() for k, v in params.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=OUTER_LR)

    def grads(self, batch: TaskBatch) -> dict:
        if self.keep is not None:
            return self.algo.ablated_meta_grad(self.params, batch, self.keep).grad
        return self.algo.meta_grad(self.params, batch, decompose=self.decompose).grad

    def step(self, batch: TaskBatch) -> None:
        grad = self.grads(batch)
        for k, p in self.params.items():
            p.grad = grad[k]
        self.opt.step()


def cycling_steps(methods: dict[str, Any], batches: list) -> dict[str, Callable[[], None]]:
    """``{name: step on the next batch}``: every method walks the same batch sequence."""
    out = {}
    for name, method in methods.items():
        batch_iter = itertools.cycle(batches)
        out[name] = lambda m=method, it=batch_iter: m.step(next(it))
    return out


def grad_rel_diff(grad: dict[str, Any], reference: dict[str, Any]) -> float:
    """``‖g − g_ref‖ / ‖g_ref‖`` over all parameters, in float64 (a check that methods compute
    the same thing)."""
    from bilevel.testing import rel_err

    return rel_err({k: grad[k].double() for k in reference}, {k: v.double() for k, v in reference.items()})


def fresh_process_cell(script: str, argv: Sequence[str], cell: dict[str, Any]) -> dict[str, Any]:
    """Run ``script`` with ``argv`` and ``--cell <json>`` in a fresh interpreter (so a memory peak
    is this cell's alone) and return the JSON object on the last line it prints."""
    out = subprocess.run([sys.executable, script, *argv, "--cell", json.dumps(cell)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start(args: argparse.Namespace, note: str = "") -> SimpleNamespace:
    """The start-up every benchmark shares: allocator (re-exec), torch setup, the environment
    record and its header line, the conv4 model and the batch generator."""
    ensure_allocator(args.malloc)
    import torch

    from bilevel import ModelConfig, build_model

    device, dtype = setup_torch(args)
    env = environment(args, device)
    print(f"clock={args.clock}; torch {env['torch']} on {env['device']} ({env.get('gpu', env['processor'])}), "
          f"{env['torch_threads']} threads, {args.dtype}, malloc={args.malloc} "
          f"(GLIBC_TUNABLES={env['GLIBC_TUNABLES']}){note}{', TF32' if args.tf32 else ''}"
          f"{', cudnn.benchmark' if args.cudnn_benchmark else ''}, load average {env['loadavg_start'][0]:.2f}")
    model = build_model(ModelConfig(name="conv4"), SHAPE, args.ways).to(device, dtype)
    generator = torch.Generator().manual_seed(args.seed)
    return SimpleNamespace(device=device, dtype=dtype, env=env, model=model, generator=generator)


def cell_batches(run: SimpleNamespace, args: argparse.Namespace, tasks: int, shots: int) -> list:
    """The two meta-batches every method of a cell walks through."""
    return [make_batch(tasks, args.ways, shots, args.queries, SHAPE, run.device, run.dtype, run.generator)
            for _ in range(2)]


def environment(args: argparse.Namespace, device) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": args.dtype,
        "malloc": args.malloc,
        "tf32": args.tf32,
        "cudnn_benchmark": args.cudnn_benchmark,
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def finish(env: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any],
           args: argparse.Namespace) -> None:
    """Record the end-of-run load and write the JSON file when ``--out`` is given."""
    env["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f} "
          f"(on {env['cpu_count']} CPUs; above ~0.2 other processes shared the machine)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.out}")


def print_table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> None:
    """A fixed-width text table (floats with 3 significant digits, None as ``-``)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in line] for line in lines]
    widths = [max(len(h), *(len(t[i]) for t in text)) if text else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in text:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))
    sys.stdout.flush()
