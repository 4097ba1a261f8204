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
   finish the step, checkpoint and stop (:mod:`bilevel.signals`). Evaluations
   (:mod:`bilevel.evaluation`: a fixed task prefix within a time budget, accuracy after every
   test step with 95 % CIs) run every ``train.eval_every`` steps and once at the end, each with
   its own progress bar (:mod:`bilevel.progress`); TensorBoard: :mod:`bilevel.tb`.
4. ``metrics.json`` is written last, only by a run that finished, which then prints its summary
   (:mod:`bilevel.summary`). What the console shows goes to ``train.log`` too (:mod:`bilevel.console`).

Under ``torchrun`` the run spans its processes (:mod:`bilevel.distributed`): each draws its share
of every meta-batch and of every evaluation batch, one collective per step reduces the
meta-step, and rank 0 alone writes (the run directory, TensorBoard, ``train.log``).

The CLI prints the failures of :mod:`bilevel.errors`, and Hydra's refusals of a command line
(:mod:`bilevel.cli_errors`), without a traceback, with their exit status (2 for a
configuration error, 130/143 for SIGINT/SIGTERM, else 1) and, when a run stopped, the command
that resumes it; a refused start leaves no run directory behind.
"""
from __future__ import annotations

import logging
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

from .ablation import Ablation, resolve_ablation
from .allocator import ensure_allocator
from .algorithm import BilevelAlgorithm, build_algorithm
from .checkpoint import LATEST, save_checkpoint
from .cli_errors import explain, override_words
from .console import log_file, log_started, silence_run_log
from .cosine_protocol import CosineProbe
from .config import DEVICES, flatten, register_configs, typed_config, validate
from .data import TaskSampler, build_sampler, input_shape
from .distributed import (
    Quiet, Replicas, check_command_line, check_launch, detect_launch, rank_device, resolve_backend, tasks_in_memory,
)
from .errors import BilevelError, ConfigError, RunInterrupted
from .evaluation import Evaluation, TaskSet, ci95, evaluate, headline_step
from .execution_choice import ExecutionChoice, cache_key, measure_paths, settle_execution
from .finite import FiniteGuard, step_tensors
from .head_policy import before_outer_step, initialise_head
from .memory import check_meta_step_memory
from .models import BilevelModel, build_model
from .naming import Naming, hydra_naming
from .params import HEAD_BIAS, HEAD_WEIGHT, Params, tree_norm
from .progress import phase_bar, training_bar
from .resume import check_resume, checkpoint_to_resume, fingerprint, resume_command
from .rng import global_rng_state, set_global_rng_state
from .run_dir import RunDirectory, discard_unstarted
from .signals import GracefulStop
from .structural import idle_ablation_warning, structural_zeros
from .summary import evaluation_line, run_summary, run_title
from .tb import RunLogger

TRIAL_SEED_OFFSET = 20_000  # the execution measurement's own sampler: seed + this
log = logging.getLogger(__name__)


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
    """Everything a training run needs, built and validated before any training; ``warnings``
    are said once the run starts."""

    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    model: BilevelModel
    params: Params
    algorithm: BilevelAlgorithm
    ablation: Ablation
    sampler: TaskSampler
    eval_tasks: TaskSet
    test_tasks: TaskSet
    headline: int
    structural: dict[str, str]
    warnings: list[str]
    replicas: Replicas


def task_set(cfg: DictConfig, split: str, tasks: int, budget_s: float, device, dtype, share) -> TaskSet:
    """The fixed evaluation tasks of ``split`` (:class:`~bilevel.evaluation.TaskSet`), each batch
    drawn as this process's ``share`` of it."""
    return TaskSet(cfg.data, split, tasks, cfg.eval.batch, budget_s, cfg.seed, device, dtype, share)


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
        evals = task_set(cfg, cfg.eval.split, cfg.eval.tasks, cfg.eval.budget_s, device, dtype, launch.share)
        tests = task_set(cfg, cfg.eval.final_split, cfg.eval.final_tasks, cfg.eval.final_budget_s, device, dtype,
                         launch.share)
        headline = headline_step(algorithm, cfg.eval.headline_step)
    except (ValueError, FileNotFoundError) as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err
    zeros = structural_zeros(algorithm, cfg.head.policy)
    warnings = [w for w in [idle_ablation_warning(ablation, algorithm, zeros, cfg.ablation.name)] if w]
    return Run(cfg, device, dtype, model, params, algorithm, ablation, sampler, evals, tests, headline, zeros,
               warnings, replicas)


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
    """What a checkpoint holds: everything the rest of the run depends on, random states
    included, and the settled number of evaluation batches (so curves keep their tasks)."""
    return {
        "step": step, "params": run.params, "optimizer": optimizer.state_dict(),
        "algorithm": run.algorithm.state_dict(), "sampler": run.sampler.state_dict(), "rng": global_rng_state(),
        "execution": execution, "config": OmegaConf.to_container(run.cfg, resolve=True),
        "fingerprint": fingerprint(run.cfg, execution, run.device), "time": time.time(),
        "eval_batches": run.eval_tasks.batches,
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
    if state.get("eval_batches") is not None and run.cfg.eval == state["config"]["eval"]:
        run.eval_tasks.batches = state["eval_batches"]


def train(cfg: Any, run_dir: str | Path, show_progress: bool = True, naming: Optional[Naming] = None) -> dict[str, float]:
    """Run meta-training in ``run_dir``; returns the final metrics (``metrics.json``)."""
    run = setup(cfg)
    if not run.replicas.writer:
        silence_run_log(Path(run_dir))
    with run.replicas.running(run_dir) as directory:
        return _train(run, directory, show_progress and run.replicas.writer, naming or Naming(run.algorithm.name))


def _train(run: Run, directory: RunDirectory | Quiet, show_progress: bool, naming: Naming) -> dict[str, float]:
    cfg, params, algorithm = run.cfg, run.params, run.algorithm
    began = time.perf_counter()
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
    algorithm.execution = cfg.execution = choice.path
    directory.begin(OmegaConf.to_yaml(cfg), note=choice.reason)
    what = run_title(cfg, algorithm)
    log.info(f"training {what} for {cfg.train.steps} outer steps in {directory.path.resolve()}")
    if found:
        log.info(f"resuming {found[0]} at step {start}")
    log.info(choice.reason)
    for warning in run.warnings:
        log.warning("warning: " + warning)
    logger = RunLogger(directory.path, naming.name, resume=(start, found[1]["time"]) if found else None,
                       structural=run.structural) if run.replicas.writer else Quiet(directory.path)
    logger.text("run/execution", choice.reason, start)
    guard = FiniteGuard(run.device, checked_until=start)
    eval_seconds = 0.0
    probe = CosineProbe(cfg.cosine, cfg.data, run.model, directory.path if run.replicas.writer else None,
                        run.device, run.dtype)  # the paper's cosine measurement (cfg.cosine.steps; none: off)
    if start == 0:
        probe.after_update(0, params)

    def save(step: int) -> None:
        nonlocal last_good
        guard.check(step, last_good)
        logger.flush()  # the events a resumed attempt keeps are those on disk before the checkpoint
        path = save_checkpoint(run_state(run, optimizer, step, choice.path), directory.path) if run.replicas.writer \
            else directory.path / LATEST
        last_good = f"{path} (step {step})"

    def evaluate_on(tasks: TaskSet, step: int, prefix: str, label: str) -> Evaluation:
        nonlocal eval_seconds
        with phase_bar(label, show_progress) as progress:
            result = evaluate(algorithm, params, tasks, run.headline, progress, run.replicas.rows_over_tasks)
        eval_seconds += result.seconds
        logger.scalars(result.scalars(prefix), step)
        return result

    try:
        with GracefulStop() as stop, training_bar(start, cfg.train.steps, f"{algorithm.name} train", show_progress) as bar:
            tick, loss_sum, acc_sum, count = time.perf_counter(), 0.0, 0.0, 0
            for step in range(start, cfg.train.steps):
                batch = run.sampler.sample().to(run.device, run.dtype)
                before_outer_step(params, cfg.head.policy)
                done = step + 1
                every = cfg.train.decompose_every
                decompose_now = every > 0 and (step % every == 0 or (done == cfg.train.steps and run.ablation.plain))
                result, update = run.ablation.step(algorithm, params, batch, decompose_now)
                result, update, labels = run.replicas.reduce_step(result, update, batch, stop)  # the whole meta-batch's
                for k, p in params.items():
                    p.grad = update[k]
                optimizer.step()
                algorithm.outer_step_done()
                probe.after_update(done, params)
                guard.observe(done, step_tensors(result.loss, update, params, optimizer))
                run.replicas.check_replicas(done, lambda: run_state(run, optimizer, done, choice.path), ignore=("time",))
                loss_sum, acc_sum, count = loss_sum + result.loss.detach(), acc_sum + result.accuracy.detach(), count + 1

                if decompose_now:
                    images = cfg.train.image_every > 0 and (step % cfg.train.image_every == 0 or done == cfg.train.steps)
                    logger.decomposition(result.decomposition, labels, step, images)
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    guard.check(done, last_good)
                    elapsed = time.perf_counter() - tick
                    scalars = {
                        "train/loss": loss_sum / count, "train/accuracy": acc_sum / count,
                        "train/head_norm": torch.sqrt(params[HEAD_WEIGHT].pow(2).sum() + params[HEAD_BIAS].pow(2).sum()),
                        "train/params_norm": tree_norm(params), "train/step_seconds": elapsed / count,
                    }
                    scalars.update({k: v for k, v in result.extras.items()})
                    logger.scalars(scalars, done)
                    bar.set_postfix(loss=f"{float(scalars['train/loss']):.3f}", acc=f"{float(scalars['train/accuracy']):.3f}")
                    tick, loss_sum, acc_sum, count = time.perf_counter(), 0.0, 0.0, 0
                if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                    guard.check(done, last_good)
                    result_eval = evaluate_on(run.eval_tasks, done, "eval", f"evaluation at step {done}")
                    bar.unpause()  # the evaluation's time is not training time: the ETA stays put
                    log.info(f"step {done}: {evaluation_line(result_eval, cfg.eval.split)}")
                    tick = time.perf_counter()
                signum = run.replicas.stop_signal(stop)
                if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or signum is not None:
                    save(done)
                if signum is not None:
                    name = signal.Signals(signum).name
                    raise RunInterrupted(f"stopped by {name} after step {done}; checkpoint: {last_good}", signum)
                bar.update(1)
        final = evaluate_on(run.test_tasks, cfg.train.steps, "test", f"final test ({cfg.eval.final_split})")
        metrics = final_metrics(final, cfg.train.steps, time.perf_counter() - began)
        logger.hparams({**dict(naming.choices), **flatten(OmegaConf.to_container(cfg, resolve=True))}, naming.swept,
                       HPARAM_METRICS, naming.trial_id)
        directory.write_metrics(metrics)
        if run.replicas.writer:
            log.info(run_summary(what, start, cfg.train.steps, final, cfg.eval.final_split, cfg.data.ways,
                                 time.perf_counter() - began, eval_seconds, directory.path.resolve(),
                                 log_file(directory.path), Path(logger.writer.log_dir).resolve().parent,
                                 naming.sweep_dir))
    finally:
        logger.close()
    return metrics


HPARAM_METRICS = ("test/accuracy", "test_zeroed/accuracy", "eval/accuracy")
"""The HPARAMS metrics: the headline final test accuracy (head as trained and zeroed) and
the last evaluation's."""


def final_metrics(final: Evaluation, steps: int, wall_s: float) -> dict[str, float]:
    """``metrics.json``: the final test's scalars (``test_accuracy`` is the headline,
    ``test_accuracy_step_k`` and ``test_ci95_step_k`` per test step, the same for
    ``test_zeroed_*``), ``test_tasks``, ``test_headline_step``, ``steps`` and ``wall_seconds``."""
    metrics = {k.replace("/", "_"): v for k, v in final.scalars("test").items()}
    metrics.update(test_headline_step=float(final.headline), steps=float(steps), wall_seconds=round(wall_s, 1))
    return metrics


_TRACEBACKS = {"shown": os.environ.get("HYDRA_FULL_ERROR") == "1"}
"""Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``), read before :func:`main`
sets the variable for Hydra."""


def _exit_on(error: BaseException, run_dir: str) -> None:
    """Say ``error`` without a traceback (the resume command too when the run stopped) and exit
    with its status; with ``HYDRA_FULL_ERROR=1`` re-raise it. A run that had started says it
    through its log (console and ``train.log``); a refused start prints it and leaves no run
    directory behind (:func:`~bilevel.run_dir.discard_unstarted`)."""
    if _TRACEBACKS["shown"]:
        raise error
    stopped = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    if isinstance(error, KeyboardInterrupt):
        message, status = "interrupted by SIGINT; the run directory keeps its last checkpoint, if any", 130
    else:
        message, status = str(error), error.exit_code
    lines = [message if stopped else f"error: {message}"]
    if stopped:
        lines.append("resume with: " + resume_command(HydraConfig.get().overrides.task, run_dir))
    if log_started(Path(run_dir)):
        log.error("\n".join(lines))
    else:
        print("\n".join(lines), file=sys.stderr, flush=True)
    if status == ConfigError.exit_code and detect_launch().writer:  # one process removes it, or they race
        discard_unstarted(run_dir, os.getcwd())
    sys.exit(status)


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, run_dir, naming=hydra_naming())
    except (BilevelError, KeyboardInterrupt) as error:
        _exit_on(error, run_dir)
    return metrics.get("test_accuracy")


def main() -> None:
    """Console entry point ``bilevel-train``. Runs under the page-retaining allocator
    (:mod:`bilevel.allocator`) unless ``BILEVEL_ALLOCATOR=default``. Hydra's refusals of the
    command line (:mod:`bilevel.cli_errors`) are printed as one paragraph, exit status 2."""
    ensure_allocator(os.environ.get("BILEVEL_ALLOCATOR", "retain"), ["-m", "bilevel.train"] + sys.argv[1:])
    _TRACEBACKS["shown"] = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its failures to us instead of printing them
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    register_configs()
    try:
        _hydra_main()
    except Exception as error:  # noqa: BLE001  (explained or re-raised)
        explained = None if _TRACEBACKS["shown"] else explain(error, override_words(sys.argv[1:]))
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr, flush=True)
        sys.exit(explained.exit_code)


if __name__ == "__main__":
    main()
