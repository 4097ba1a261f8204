"""The training app: ``bilevel-train`` / ``python -m bilevel.train`` (Hydra).

A run, in order (``docs/reliability.md`` states what is guaranteed):

1. :func:`setup` validates everything before any work — schema keys and declared ranges,
   algorithm and options, ablation terms, data shapes and directories, device, and a memory
   estimate of one meta-step — and builds data, model and algorithm.
2. :func:`train` takes the run directory (:mod:`bilevel.run_dir`: lock, stale temporary files),
   reads its checkpoint and checks the resume contract (:mod:`bilevel.resume`), settles the
   execution path (:mod:`bilevel.execution_choice`), and only then writes ``config.yaml``.
3. Every step is watched for non-finite values (:mod:`bilevel.finite`); a checkpoint (the last
   two kept, :mod:`bilevel.checkpoint`) holds every random state of the run; SIGINT/SIGTERM
   finish the step, checkpoint and stop (:mod:`bilevel.signals`).
4. ``metrics.json`` is written last, only by a run that finished.

Under ``torchrun`` the run spans its processes (:mod:`bilevel.distributed`): each draws its share
of every meta-batch, one collective per step reduces the meta-step, and rank 0 alone writes.

The CLI prints the failures of :mod:`bilevel.errors` without a traceback, with their exit
status (2 for a configuration error, 130/143 for SIGINT/SIGTERM, else 1) and, when a run
stopped, the command that resumes it.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .ablation import Ablation, resolve_ablation
from .allocator import ensure_allocator
from .algorithm import BilevelAlgorithm, build_algorithm
from .checkpoint import LATEST, save_checkpoint
from .config import DEVICES, register_configs, typed_config, validate
from .data import TaskBatch, TaskSampler, build_sampler, input_shape
from .distributed import (
    Launch, Quiet, Replicas, check_command_line, check_launch, detect_launch, rank_device, resolve_backend,
    tasks_in_memory,
)
from .errors import BilevelError, ConfigError, RunInterrupted
from .execution_choice import ExecutionChoice, cache_key, measure_paths, settle_execution
from .finite import FiniteGuard, step_tensors
from .head_policy import before_outer_step, initialise_head, zeroed_head
from .memory import check_meta_step_memory
from .models import BilevelModel, build_model
from .params import HEAD_BIAS, HEAD_WEIGHT, Params, tree_norm
from .resume import check_resume, checkpoint_to_resume, fingerprint, resume_command
from .rng import global_rng_state, set_global_rng_state
from .run_dir import RunDirectory
from .signals import GracefulStop
from .tb import RunLogger

TRIAL_SEED_OFFSET = 20_000  # the execution measurement's own sampler: seed + this


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Run:
    """Everything a training run needs, built and validated before any training."""

    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    model: BilevelModel
    params: Params
    algorithm: BilevelAlgorithm
    ablation: Ablation
    sampler: TaskSampler
    eval_batches: list[TaskBatch]
    replicas: Replicas


def eval_batches(cfg: DictConfig, split: str, tasks: int, device, dtype, launch: Launch = Launch()) -> list[TaskBatch]:
    """A fixed set of ``tasks`` evaluation tasks (same seed every time), in meta-batches (of this
    process's share, for a run over many)."""
    size = min(cfg.train.meta_batch * 4, tasks)
    sampler = launch.share(build_sampler(cfg.data, split, size, seed=cfg.seed + 10_000))
    return [sampler.sample().to(device, dtype) for _ in range(math.ceil(tasks / size))]


def setup(cfg: Any) -> Run:
    """Validate the configuration and build the run (data, model, algorithm, ablation).

    Every refusal is a :class:`~bilevel.errors.ConfigError` raised before any work: the
    schema's keys and checks, then whatever building data, model and algorithm refuses
    (their ``ValueError``s say which key to change), then the memory estimate."""
    cfg = typed_config(cfg)
    validate(cfg)
    launch = detect_launch()
    try:
        device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
        check_launch(launch, cfg, device)
        device = rank_device(launch, device)
        replicas = Replicas(launch, device, resolve_backend(cfg.dist.backend, device), cfg.dist.timeout_s,
                            cfg.dist.check_every)
        torch.manual_seed(cfg.seed)
        shape = input_shape(cfg.data)
        model = build_model(cfg.model, shape, cfg.data.ways)
        algorithm = build_algorithm(cfg.algorithm, model)
        check_meta_step_memory(model, shape, cfg, algorithm.config, algorithm.train_steps, device, dtype,
                               tasks_in_memory(launch, cfg.train.meta_batch, device))
        model.to(device=device, dtype=dtype)
        params = model.init_params()
        initialise_head(params, cfg.head.policy, cfg.head.scale)
        ablation = resolve_ablation(
            None if cfg.ablation.keep is None else list(cfg.ablation.keep), list(cfg.ablation.drop), algorithm
        )
        if cfg.execution not in ("auto",) + tuple(algorithm.executions):
            raise ConfigError(
                f"execution={cfg.execution} is not available for algorithm {algorithm.name!r} with this "
                f"configuration; available: {', '.join(algorithm.executions)} (or auto)"
            )
        sampler = launch.share(build_sampler(cfg.data, "train", cfg.train.meta_batch, seed=cfg.seed))
        evals = eval_batches(cfg, cfg.eval.split, cfg.eval.tasks, device, dtype, launch)
    except (ValueError, FileNotFoundError) as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err
    return Run(cfg, device, dtype, model, params, algorithm, ablation, sampler, evals, replicas)


def evaluate(algorithm: BilevelAlgorithm, params: Params, batches: list[TaskBatch], zero_head: bool,
             replicas: Replicas) -> torch.Tensor:
    """Mean query accuracy after 0 … test_steps inner steps over the fixed task set (over all
    processes' shares: every batch of the set is shared out alike)."""
    p = zeroed_head(params) if zero_head else params
    accs = [algorithm.evaluate(p, b, algorithm.eval_steps) for b in batches]
    return replicas.mean_over_tasks(torch.stack(accs).mean(0), batches[0])


def eval_scalars(prefix: str, accs: torch.Tensor) -> dict[str, float]:
    values = {f"{prefix}/accuracy": float(accs[-1])}
    values.update({f"{prefix}/accuracy_step_{i}": float(a) for i, a in enumerate(accs)})
    return values


def settle_path(run: Run, recorded: Optional[str]) -> ExecutionChoice:
    """The run's execution path (:func:`~bilevel.execution_choice.settle_execution`); a
    measurement draws its batch from a sampler of its own."""
    cfg, algorithm = run.cfg, run.algorithm

    def measure() -> dict[str, float]:
        batch = run.sampler.fork(cfg.seed + TRIAL_SEED_OFFSET).sample().to(run.device, run.dtype)
        return measure_paths(algorithm, run.params, batch, run.device)

    key = cache_key(run.device, {**fingerprint(cfg, "auto", run.device), "processes": run.replicas.launch.world})
    return settle_execution(cfg.execution, algorithm.executions, recorded, key, measure)


def run_state(run: Run, optimizer: torch.optim.Optimizer, step: int, execution: str) -> dict[str, Any]:
    """What a checkpoint holds: everything the rest of the run depends on, random states included."""
    return {
        "step": step, "params": run.params, "optimizer": optimizer.state_dict(),
        "algorithm": run.algorithm.state_dict(), "sampler": run.sampler.state_dict(), "rng": global_rng_state(),
        "execution": execution, "config": OmegaConf.to_container(run.cfg, resolve=True),
        "fingerprint": fingerprint(run.cfg, execution, run.device), "time": time.time(),
    }


def restore(run: Run, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load :func:`run_state` into the run (the resume contract has been checked)."""
    with torch.no_grad():
        for k, v in state["params"].items():
            run.params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    run.algorithm.load_state_dict(state["algorithm"])
    run.sampler.load_state_dict(state["sampler"])
    set_global_rng_state(state["rng"])


def train(cfg: Any, run_dir: str | Path, show_progress: bool = True) -> dict[str, float]:
    """Run meta-training in ``run_dir``; returns the final metrics."""
    run = setup(cfg)
    with run.replicas.running(run_dir) as directory:
        return _train(run, directory, show_progress and run.replicas.writer)


def _train(run: Run, directory: RunDirectory | Quiet, show_progress: bool) -> dict[str, float]:
    cfg, params, algorithm = run.cfg, run.params, run.algorithm
    optimizer = algorithm.make_outer_optimizer(list(params.values()), cfg.train.lr)

    def begin() -> tuple[Optional[tuple[Path, dict[str, Any]]], ExecutionChoice]:
        found = checkpoint_to_resume(directory.path, cfg.train.resume)
        choice = settle_path(run, found[1]["execution"] if found else None)
        if found:
            check_resume(found[0], found[1]["step"], found[1]["fingerprint"], fingerprint(cfg, choice.path, run.device),
                         cfg.train.resume)
        return found, choice

    found, choice = run.replicas.first(begin)  # rank 0 reads, measures and checks; every process continues alike
    start, last_good = 0, "none written yet"
    if found:
        path, state = found
        restore(run, optimizer, state)
        start, last_good = state["step"], f"{path} (step {state['step']})"
        print(f"resuming {path} at step {start}")
    algorithm.execution = cfg.execution = choice.path
    print(choice.reason)
    directory.begin(OmegaConf.to_yaml(cfg), note=choice.reason)
    logger = RunLogger(directory.path, resume=(start, found[1]["time"]) if found else None) if run.replicas.writer \
        else Quiet(directory.path)
    logger.text("run/execution", choice.reason, start)
    guard = FiniteGuard(run.device, checked_until=start)

    def save(step: int) -> None:
        nonlocal last_good
        guard.check(step, last_good)
        logger.flush()  # the events a resumed attempt keeps are those on disk before the checkpoint
        path = save_checkpoint(run_state(run, optimizer, step, choice.path), directory.path) if run.replicas.writer \
            else directory.path / LATEST
        last_good = f"{path} (step {step})"

    def log_eval(step: int, split_batches: list[TaskBatch], prefix: str) -> dict[str, float]:
        def accuracies(zero_head: bool) -> torch.Tensor:
            return evaluate(algorithm, params, split_batches, zero_head=zero_head, replicas=run.replicas)

        values = eval_scalars(prefix, accuracies(zero_head=False))
        values.update(eval_scalars(prefix + "_zeroed", accuracies(zero_head=True)))
        logger.scalars(values, step)
        return values

    try:
        with GracefulStop() as stop:
            bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
                       disable=not show_progress, desc=f"{algorithm.name} train", dynamic_ncols=True)
            tick, loss_sum, acc_sum, count = time.perf_counter(), 0.0, 0.0, 0
            for step in bar:
                batch = run.sampler.sample().to(run.device, run.dtype)
                before_outer_step(params, cfg.head.policy)
                decompose_now = cfg.train.decompose_every > 0 and step % cfg.train.decompose_every == 0
                result, update = run.ablation.step(algorithm, params, batch, decompose_now)
                result, update, labels = run.replicas.reduce_step(result, update, batch, stop)  # the whole meta-batch's
                for k, p in params.items():
                    p.grad = update[k]
                optimizer.step()
                algorithm.outer_step_done()
                done = step + 1
                guard.observe(done, step_tensors(result.loss, update, params, optimizer))
                run.replicas.check_replicas(done, lambda: run_state(run, optimizer, done, choice.path), ignore=("time",))
                loss_sum, acc_sum, count = loss_sum + result.loss.detach(), acc_sum + result.accuracy.detach(), count + 1

                if decompose_now:
                    images = cfg.train.image_every > 0 and step % cfg.train.image_every == 0
                    logger.decomposition(result.decomposition, labels, step, images)
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    guard.check(done, last_good)
                    elapsed = time.perf_counter() - tick
                    scalars = {
                        "train/loss": loss_sum / count, "train/accuracy": acc_sum / count,
                        "head/norm": torch.sqrt(params[HEAD_WEIGHT].pow(2).sum() + params[HEAD_BIAS].pow(2).sum()),
                        "params/norm": tree_norm(params), "time/step_seconds": elapsed / count,
                    }
                    scalars.update({k: v for k, v in result.extras.items()})
                    logger.scalars(scalars, done)
                    bar.set_postfix(loss=f"{float(scalars['train/loss']):.3f}", acc=f"{float(scalars['train/accuracy']):.3f}")
                    tick, loss_sum, acc_sum, count = time.perf_counter(), 0.0, 0.0, 0
                if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                    guard.check(done, last_good)
                    values = log_eval(done, run.eval_batches, "eval")
                    bar.write(f"step {done}: eval accuracy {values['eval/accuracy']:.3f} "
                              f"(test-time zeroing {values['eval_zeroed/accuracy']:.3f})")
                signum = run.replicas.stop_signal(stop)
                if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or signum is not None:
                    save(done)
                if signum is not None:
                    name = signal.Signals(signum).name
                    raise RunInterrupted(f"stopped by {name} after step {done}; checkpoint: {last_good}", signum)
        final = eval_batches(cfg, cfg.eval.final_split, cfg.eval.final_tasks, run.device, run.dtype, run.replicas.launch)
        metrics = {k.replace("/", "_"): v for k, v in log_eval(cfg.train.steps, final, "test").items()}
        metrics["steps"] = float(cfg.train.steps)
        logger.hparams(cfg, metrics)
        directory.write_metrics(metrics)
    finally:
        logger.close()
    return metrics


def _exit_on(error: BaseException, run_dir: str) -> None:
    """Print ``error`` without a traceback (the resume command too when the run stopped) and
    exit with its status; with ``HYDRA_FULL_ERROR=1`` re-raise it, as Hydra does."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    stopped = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    if isinstance(error, KeyboardInterrupt):
        message, status = "interrupted by SIGINT; the run directory keeps its last checkpoint, if any", 130
    else:
        message, status = str(error), error.exit_code
    lines = [message if stopped else f"error: {message}"]
    if stopped:
        lines.append("resume with: " + resume_command(HydraConfig.get().overrides.task, run_dir))
    print("\n".join(lines), file=sys.stderr, flush=True)
    sys.exit(status)


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, run_dir)
    except (BilevelError, KeyboardInterrupt) as error:
        _exit_on(error, run_dir)
    return metrics.get("test_accuracy")


def main() -> None:
    """Console entry point ``bilevel-train``. Runs under the page-retaining allocator
    (:mod:`bilevel.allocator`) unless ``BILEVEL_ALLOCATOR=default``."""
    ensure_allocator(os.environ.get("BILEVEL_ALLOCATOR", "retain"), ["-m", "bilevel.train"] + sys.argv[1:])
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        _exit_on(error, "")
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
