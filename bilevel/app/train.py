"""The training app: ``bilevel-train`` / ``python -m bilevel.app.train`` (Hydra).

A run, in order (``docs/reliability.md`` states what is guaranteed):

1. :func:`setup` validates everything before any work — schema keys and declared ranges,
   algorithm and options, ablation terms, data shapes and directories, device, and a memory
   estimate of one meta-step — and builds data, model and algorithm.
2. :func:`train` takes the run directory (:mod:`bilevel.app.run_dir`: lock, stale temporary files),
   reads its checkpoint and checks the resume contract (:mod:`bilevel.app.resume`), settles the
   execution path (:mod:`bilevel.app.execution_choice`) — :func:`begin`, then :func:`resume` — and
   only then writes ``config.yaml`` (:func:`open_run`). Each step is :meth:`Attempt.step`, its
   logging :meth:`Attempt.log_training` / :meth:`Attempt.log_decomposition`, the evaluations
   :meth:`Attempt.evaluate`, the checkpoints :meth:`Attempt.checkpoint`, the end :meth:`Attempt.finish`.
3. Every step is watched for non-finite values (:mod:`bilevel.app.finite`); a checkpoint (the last
   two kept, :mod:`bilevel.app.checkpoint`) holds every random state of the run; SIGINT/SIGTERM
   finish the step, checkpoint and stop (:mod:`bilevel.app.signals`). Evaluations
   (:mod:`bilevel.app.evaluation`: a fixed task prefix within a time budget, accuracy after every
   test step with 95 % CIs) run every ``train.eval_every`` steps and once at the end, each with
   its own progress bar (:mod:`bilevel.app.progress`); TensorBoard: :mod:`bilevel.app.tb`.
4. ``metrics.json`` is written last, only by a run that finished, which then prints its summary
   (:mod:`bilevel.app.summary`). What the console shows goes to ``train.log`` too (:mod:`bilevel.app.console`).

Under ``torchrun`` the run spans its processes (:mod:`bilevel.app.distributed`): each draws its share
of every meta-batch and of every evaluation batch, one collective per step reduces the
meta-step, and rank 0 alone writes (the run directory, TensorBoard, ``train.log``).

The CLI prints the failures of :mod:`bilevel.errors`, and Hydra's refusals of a command line
(:mod:`bilevel.app.cli_errors`), without a traceback, with their exit status (2 for a
configuration error, 130/143 for SIGINT/SIGTERM, else 1) and, when a run stopped, the command
that resumes it; a refused start leaves no run directory behind.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bilevel import tags
from bilevel.decomposition.ablation import Ablation, resolve_ablation
from bilevel.execution.allocator import ensure_allocator
from bilevel.algorithm import BilevelAlgorithm, MetaStep, build_algorithm
from bilevel.app.catalog import unknown_algorithm_message
from bilevel.app.checkpoint import LATEST, latest_checkpoint, save_checkpoint
from bilevel.app.cli_errors import check_overrides, explain, explain_os_error, override_words
from bilevel.app.cosine_protocol import CosineProbe
from bilevel.app.console import log_file, log_started, silence_run_log
from bilevel.app.config import DEVICES, flatten, register_configs, typed_config, validate
from bilevel.data import TaskBatch, TaskSampler, build_sampler, input_shape
from bilevel.app.distributed import (
    GatheredLabels, Quiet, Replicas, check_command_line, check_launch, detect_launch, rank_device, resolve_backend,
    tasks_in_memory,
)
from bilevel.errors import BilevelError, ConfigError, RunInterrupted, StorageError, UnknownAlgorithm
from bilevel.app.evaluation import Evaluation, TaskSet, evaluate, headline_step
from bilevel.app.execution_choice import ExecutionChoice, PathCheck, cache_key, measure_paths, settle_execution
from bilevel.app.finite import FiniteGuard, step_tensors
from bilevel.app.head_policy import before_outer_step, initialise_head
from bilevel.app.loss_scale import DynamicLossScale
from bilevel.execution.memory import MemoryPlan, budget_words, memory_plans
from bilevel.primitives.dropblock import drop_masks, mask_key
from bilevel.primitives.models import BilevelModel, build_model
from bilevel.app.naming import Naming, hydra_naming
from bilevel.primitives.head import row_spread
from bilevel.primitives.precision import mixed_precision, precision_warning
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, Params, tree_norm
from bilevel.app.progress import phase_bar, training_bar
from bilevel.app.resume import check_resume, checkpoint_to_resume, fingerprint, resume_command
from bilevel.rng import global_rng_state, set_global_rng_state
from bilevel.app.run_dir import RunDirectory, discard_unstarted
from bilevel.app.signals import GracefulStop
from bilevel.files import check_cache_dir, storage_error
from bilevel.app.preflight import check_model, check_outer_lr
from bilevel.app.streams import survive_closed_console
from bilevel.app.stalls import StallWatch
from bilevel.decomposition.structural import idle_ablation_warning, structural_zeros
from bilevel.app.summary import evaluation_line, identity_line, run_summary, run_title
from bilevel.app.tb import RunLogger

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
    plans: list[MemoryPlan]
    loss_scale: Optional[DynamicLossScale] = None


def task_set(cfg: DictConfig, split: str, tasks: int, budget_s: float, device: torch.device, dtype: torch.dtype,
             share: Callable[[TaskSampler], TaskSampler]) -> TaskSet:
    """The fixed evaluation tasks of ``split`` (:class:`~bilevel.app.evaluation.TaskSet`), each batch
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
        if cfg.precision != "fp32" and cfg.dtype != "float32":
            raise ConfigError(f"precision={cfg.precision} keeps float32 master parameters; it needs dtype=float32, "
                              f"got dtype={cfg.dtype} (or set precision=fp32)")
        check_launch(launch, cfg, device)
        check_cache_dir()
        device = rank_device(launch, device)
        replicas = Replicas(launch, device, resolve_backend(cfg.dist.backend, device), cfg.dist.timeout_s,
                            cfg.dist.check_every)
        torch.manual_seed(cfg.seed)
        shape = input_shape(cfg.data)
        sampler = launch.share(build_sampler(cfg.data, "train", cfg.train.meta_batch, seed=cfg.seed))
        evals = task_set(cfg, cfg.eval.split, cfg.eval.tasks, cfg.eval.budget_s, device, dtype, launch.share)
        tests = task_set(cfg, cfg.eval.final_split, cfg.eval.final_tasks, cfg.eval.final_budget_s, device, dtype,
                         launch.share)  # data (directories, classes per split) before the memory estimates
        check_model(cfg, shape, device, dtype)
        model = build_model(cfg.model, shape, cfg.data.ways)
        algorithm = build_algorithm(cfg.algorithm, model)
        if cfg.execution not in ("auto",) + tuple(algorithm.executions):
            raise ConfigError(
                f"execution={cfg.execution} is not available for algorithm {algorithm.name!r} with this "
                f"configuration; available: {', '.join(algorithm.executions)} (or auto)"
            )
        if cfg.memory != "auto":
            algorithm = algorithm.with_memory(cfg.memory)
        plans = memory_plans(model, shape, cfg, algorithm, device, dtype,
                             tasks_in_memory(launch, cfg.train.meta_batch, device))
        model.to(device=device, dtype=dtype)
        params = model.init_params()
        initialise_head(params, cfg.head.policy, cfg.head.scale, cfg.head.init)
        params = algorithm.meta_parameters(params)
        check_outer_lr(cfg, algorithm, params)
        ablation = resolve_ablation(
            None if cfg.ablation.keep is None else list(cfg.ablation.keep), list(cfg.ablation.drop), algorithm
        )
        headline = headline_step(algorithm, cfg.eval.headline_step)
    except (ValueError, FileNotFoundError) as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err
    zeros = structural_zeros(algorithm, cfg.head.policy, ablation.terms)
    warnings = [w for w in [idle_ablation_warning(ablation, algorithm, zeros, cfg.ablation.name),
                            precision_warning(cfg.precision, algorithm.name, device)] if w]
    return Run(cfg, device, dtype, model, params, algorithm, ablation, sampler, evals, tests, headline, zeros,
               warnings, replicas, plans, DynamicLossScale() if cfg.precision == "fp16" else None)


def settle_path(run: Run, recorded: Optional[tuple[str, str]]) -> ExecutionChoice:
    """The run's execution path and memory strategy among those that fit
    (:func:`~bilevel.app.execution_choice.settle_execution`); a measurement draws its batch from a
    sampler of its own."""
    cfg, algorithm = run.cfg, run.algorithm
    ways = [(p.path, p.memory) for p in run.plans]

    def measure() -> dict[str, float]:
        log.info(f"timing the ways of running tasks ({', '.join(algorithm.executions)}) on this machine: once per "
                 f"configuration, a few meta-steps each")
        batch = run.sampler.fork(cfg.seed + TRIAL_SEED_OFFSET).sample().to(run.device, run.dtype)
        return measure_paths(algorithm, run.params, batch, run.device, ways)

    key = cache_key(run.device, {**fingerprint(cfg, "auto", run.device), "processes": run.replicas.launch.world,
                                 "ways": ways})
    budget = budget_words(run.plans, cfg.train.memory_gb, run.device)
    return settle_execution((cfg.execution, cfg.memory), ways, recorded, key, measure, budget)


def run_state(run: Run, optimizer: torch.optim.Optimizer, step: int, execution: str) -> dict[str, Any]:
    """What a checkpoint holds: everything the rest of the run depends on, random states
    included, and the settled number of evaluation batches (so curves keep their tasks)."""
    return {
        "step": step, "params": run.params, "optimizer": optimizer.state_dict(),
        "algorithm": run.algorithm.state_dict(), "sampler": run.sampler.state_dict(), "rng": global_rng_state(),
        "execution": execution, "memory": run.cfg.memory, "config": OmegaConf.to_container(run.cfg, resolve=True),
        "fingerprint": fingerprint(run.cfg, execution, run.device), "time": time.time(),
        "eval_batches": run.eval_tasks.batches,
        "loss_scale": None if run.loss_scale is None else run.loss_scale.state_dict(),
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
    if run.loss_scale is not None and state.get("loss_scale") is not None:
        run.loss_scale.load_state_dict(state["loss_scale"])


def train(cfg: Any, run_dir: str | Path, show_progress: bool = True, naming: Optional[Naming] = None) -> dict[str, float]:
    """Run meta-training in ``run_dir``; returns the final metrics (``metrics.json``)."""
    run = setup(cfg)
    if not run.replicas.writer:
        silence_run_log(Path(run_dir))
    with run.replicas.running(run_dir) as directory, mixed_precision(run.cfg.precision, run.loss_scale):
        return _train(run, directory, show_progress and run.replicas.writer, naming or Naming(run.algorithm.name))


Found = Optional[tuple[Path, dict[str, Any]]]
"""The checkpoint an attempt resumes, and its state (None: a new run)."""


def begin(run: Run, directory: RunDirectory | Quiet) -> tuple[Found, ExecutionChoice]:
    """Rank 0's start of an attempt: the checkpoint to resume (:func:`~bilevel.app.resume.checkpoint_to_resume`),
    the execution path (:func:`settle_path`; a resumed run keeps its recorded one) and the resume
    contract, checked against the fingerprint of that path (:func:`~bilevel.app.resume.check_resume`)."""
    cfg = run.cfg
    found = checkpoint_to_resume(directory.path, cfg.train.resume)
    choice = settle_path(run, (found[1]["execution"], found[1].get("memory", "store")) if found else None)
    if found:
        check_resume(found[0], found[1]["step"], found[1]["fingerprint"],
                     fingerprint(cfg, choice.path, run.device, choice.memory), cfg.train.resume)
    return found, choice


def resume(run: Run, optimizer: torch.optim.Optimizer, found: Found) -> tuple[int, str]:
    """Load the checkpoint ``found`` into the run (:func:`restore`); returns the first step to
    take and the last good checkpoint as messages name it."""
    if not found:
        return 0, "none written yet"
    path, state = found
    restore(run, optimizer, state)
    return state["step"], f"{path} (step {state['step']})"


def title(run: Run, naming: Naming) -> str:
    """What the run trains, as its first and last lines say it (the preset asked for, the ablation)."""
    return run_title(run.cfg, run.algorithm, run.ablation, dict(naming.choices).get("algorithm", ""))


def open_run(run: Run, directory: RunDirectory | Quiet, choice: ExecutionChoice, found: Found, start: int,
             naming: Naming) -> RunLogger | Quiet:
    """Fix the execution path, write ``config.yaml`` (only now, once everything is settled), say
    what the run is, and open its TensorBoard logger (a :class:`~bilevel.app.distributed.Quiet` on a
    rank that does not write), which records the execution path and why."""
    cfg = run.cfg
    run.algorithm = run.algorithm.with_execution(choice.path).with_memory(choice.memory)
    cfg.execution, cfg.memory = choice.path, choice.memory
    directory.begin(OmegaConf.to_yaml(cfg), note=choice.reason)
    log.info(f"training {title(run, naming)} for {cfg.train.steps} outer steps in "
             f"{directory.path.resolve()}")
    if found:
        log.info(f"resuming {found[0]} at step {start}")
    log.info(choice.reason)
    for warning in run.warnings:
        log.warning("warning: " + warning)
    logger = RunLogger(directory.path, naming.name, resume=(start, found[1]["time"]) if found else None,
                       structural=run.structural) if run.replicas.writer else Quiet(directory.path)
    logger.text(tags.RUN_EXECUTION, choice.reason, start)
    return logger


def due(done: int, every: int, steps: int) -> bool:
    """Whether an action taken every ``every`` steps is due after ``done`` steps: it is also
    taken after the last one."""
    return done % every == 0 or done == steps


def decomposes_at(step: int, cfg: DictConfig, ablation: Ablation) -> bool:
    """Whether outer step ``step`` (from 0) computes and logs the decomposition: every
    ``train.decompose_every`` steps from step 0 (0: never) and, in a run without an ablation, the
    last step too (with an ablation a decomposition step takes the encoder's update from the
    decomposition, so an extra one would change the trajectory: :data:`bilevel.app.resume.FORCEABLE`)."""
    every = cfg.train.decompose_every
    return every > 0 and (step % every == 0 or (step + 1 == cfg.train.steps and ablation.plain))


Labels = Optional[TaskBatch | GatheredLabels]
"""The labels of a whole meta-batch (:meth:`~bilevel.app.distributed.Replicas.reduce_step`): the batch
itself in one process, gathered labels on a distributed decomposition step, else None."""


@dataclass
class TrainMeans:
    """The meta-batches' loss and accuracy summed since the last log point, their count, and
    when that stretch of training time started (evaluations do not count)."""

    tick: float = field(default_factory=time.perf_counter)
    loss: Any = 0.0
    accuracy: Any = 0.0
    count: int = 0

    def add(self, result: MetaStep) -> None:
        """Count one step's loss and accuracy (tensors: no host sync here)."""
        self.loss, self.accuracy = self.loss + result.loss.detach(), self.accuracy + result.accuracy.detach()
        self.count += 1

    def restart(self) -> None:
        """Start a new stretch: nothing summed, the clock from now."""
        self.tick, self.loss, self.accuracy, self.count = time.perf_counter(), 0.0, 0.0, 0


@dataclass
class Attempt:
    """One attempt of a run, from its first step to its final test: the run, its directory,
    the outer optimiser, the settled execution ``path``, the logger, the non-finite guard, the
    last good checkpoint (as messages name it) and the seconds spent evaluating."""

    run: Run
    directory: RunDirectory | Quiet
    optimizer: torch.optim.Optimizer
    path: str
    logger: RunLogger | Quiet
    guard: FiniteGuard
    last_good: str
    show_progress: bool
    probe: CosineProbe
    path_check: PathCheck
    stalls: StallWatch
    eval_seconds: float = 0.0
    applied: bool = True

    def step(self, step: int, decompose: bool, stop: GracefulStop) -> tuple[MetaStep, Labels]:
        """Outer step ``step`` (from 0): draw the meta-batch, apply the head policy, compute the
        meta-step (with its decomposition when ``decompose``; its ``grad`` is the update the
        ablation follows; DropBlock masks keyed by the seed and the step), reduce it over the
        processes, and apply the update. Returns the whole meta-batch's meta-step and labels
        (:meth:`~bilevel.app.distributed.Replicas.reduce_step`). Under fp16 a step whose
        meta-gradient is not finite is skipped (``applied`` False:
        :class:`~bilevel.app.loss_scale.DynamicLossScale`)."""
        run, done = self.run, step + 1
        batch = run.sampler.sample().to(run.device, run.dtype)
        before_outer_step(run.params, run.cfg.head.policy)
        with drop_masks(mask_key(run.cfg.seed, step)):  # a model's DropBlock masks, fixed within the step
            result = self.path_check.timed(lambda: run.ablation.step(run.algorithm, run.params, batch, decompose),
                                           plain=not decompose)
        result, labels = run.replicas.reduce_step(result, batch, stop)
        self.applied = run.loss_scale is None or run.loss_scale.accept(done, result.grad, result.loss)
        if not self.applied:
            return result, labels
        for k, p in run.params.items():
            p.grad = result.grad[k]
        self.optimizer.step()
        run.algorithm.outer_step_done()
        self.probe.after_update(done, run.params)
        self.guard.observe(done, step_tensors(result.loss, result.grad, run.params, self.optimizer))
        run.replicas.check_replicas(done, lambda: run_state(run, self.optimizer, done, self.path), ignore=("time",))
        return result, labels

    def log_decomposition(self, result: MetaStep, labels: TaskBatch | GatheredLabels, step: int) -> None:
        """Log the decomposition of step ``step`` (from 0) at ``step + 1``, like its loss, and say its
        identity check; its images every ``train.image_every`` steps (0: never) and at the last step."""
        train = self.run.cfg.train
        images = train.image_every > 0 and (step % train.image_every == 0 or step + 1 == train.steps)
        summary = {k: float(v) for k, v in result.decomposition.summary().items()}
        self.logger.decomposition(result.decomposition, labels, step + 1, images, summary)
        log.info(f"step {step + 1}: {identity_line(summary, self.run.dtype)}")

    def log_training(self, done: int, result: MetaStep, means: TrainMeans, bar: tqdm) -> None:
        """Log the training scalars after ``done`` steps (means since the last point, norms,
        seconds per step, the algorithm's extras) once they are checked finite."""
        self.guard.check(done, self.last_good)
        if self.path_check.verdict:
            log.warning("warning: " + self.path_check.verdict)
            self.path_check.verdict = None
        elapsed = time.perf_counter() - means.tick
        params = self.run.params
        count = max(means.count, 1)  # 0 when every step since the last point was a skipped fp16 step
        scalars = {
            tags.TRAIN_LOSS: means.loss / count, tags.TRAIN_ACCURACY: means.accuracy / count,
            tags.TRAIN_HEAD_NORM: torch.sqrt(params[HEAD_WEIGHT].pow(2).sum() + params[HEAD_BIAS].pow(2).sum()),
            tags.TRAIN_HEAD_ROW_SPREAD: row_spread(params[HEAD_WEIGHT], params[HEAD_BIAS]),
            tags.TRAIN_PARAMS_NORM: tree_norm(params), tags.TRAIN_STEP_SECONDS: elapsed / count,
        }
        scalars.update(result.extras)
        if self.run.loss_scale is not None:
            scalars.update({tags.TRAIN_LOSS_SCALE: self.run.loss_scale.scale,
                            tags.TRAIN_SKIPPED_STEPS: self.run.loss_scale.skipped})
        self.logger.scalars(scalars, done)
        for warning in self.stalls.check(done, result.grad, params, scalars[tags.TRAIN_ACCURACY], means.count):
            log.warning("warning: " + warning)
        bar.set_postfix(loss=f"{float(scalars[tags.TRAIN_LOSS]):.3f}",
                        acc=f"{float(scalars[tags.TRAIN_ACCURACY]):.3f}")

    def evaluate(self, tasks: TaskSet, step: int, prefix: str, label: str) -> Evaluation:
        """Evaluate on ``tasks`` with its own progress bar and log the result under ``prefix``."""
        with phase_bar(label, self.show_progress) as progress:
            result = evaluate(self.run.algorithm, self.run.params, tasks, self.run.headline, progress,
                              self.run.replicas.rows_over_tasks)
        self.eval_seconds += result.seconds
        self.logger.scalars(result.scalars(prefix), step)
        return result

    def evaluate_during_training(self, done: int, bar: tqdm) -> None:
        """The periodic evaluation after ``done`` steps (parameters checked finite first); its
        time is not training time, so the training bar's ETA stays put."""
        self.guard.check(done, self.last_good)
        result = self.evaluate(self.run.eval_tasks, done, tags.EVAL, f"evaluation at step {done}")
        bar.unpause()
        log.info(f"step {done}: {evaluation_line(result, self.run.cfg.eval.split)}")

    def checkpoint(self, step: int) -> None:
        """Check the steps since the last check are finite, flush the events (those a resumed
        attempt keeps are the ones on disk before its checkpoint) and save the checkpoint
        (rank 0 writes it)."""
        self.guard.check(step, self.last_good)
        self.logger.flush()
        path = save_checkpoint(run_state(self.run, self.optimizer, step, self.path), self.directory.path) \
            if self.run.replicas.writer else self.directory.path / LATEST
        self.last_good = f"{path} (step {step})"

    def finish(self, start: int, began: float, naming: Naming) -> dict[str, float]:
        """The final test, the HPARAMS entry and ``metrics.json`` (written last: only a finished
        run has one), then the run's summary. Returns the final metrics."""
        run, cfg = self.run, self.run.cfg
        final = self.evaluate(run.test_tasks, cfg.train.steps, tags.TEST, f"final test ({cfg.eval.final_split})")
        metrics = final_metrics(final, cfg.train.steps, time.perf_counter() - began)
        self.logger.hparams({**dict(naming.choices), **flatten(OmegaConf.to_container(cfg, resolve=True))},
                            naming.swept, HPARAM_METRICS, naming.trial_id, sweep=bool(naming.sweep_dir))
        self.directory.write_metrics(metrics)
        if run.replicas.writer:
            log.info(run_summary(title(run, naming), start, cfg.train.steps, final, cfg.eval.final_split,
                                 cfg.data.ways, time.perf_counter() - began, self.eval_seconds,
                                 self.directory.path.resolve(), log_file(self.directory.path),
                                 Path(self.logger.writer.log_dir).resolve().parent, naming.sweep_dir))
        return metrics


def _train(run: Run, directory: RunDirectory | Quiet, show_progress: bool, naming: Naming) -> dict[str, float]:
    """The training loop of one attempt (the module docstring's steps 2–4)."""
    cfg = run.cfg
    began = time.perf_counter()
    optimizer = run.algorithm.make_outer_optimizer(list(run.params.values()), cfg.train.lr)
    found, choice = run.replicas.first(lambda: begin(run, directory))  # rank 0 reads; all continue alike
    start, last_good = resume(run, optimizer, found)
    logger = open_run(run, directory, choice, found, start, naming)
    probe = CosineProbe(cfg.cosine, cfg.data, run.model, directory.path if run.replicas.writer else None,
                        run.device, run.dtype)  # the paper's cosine measurement (cfg.cosine.steps; none: off)
    if start == 0:
        probe.after_update(0, run.params)
    attempt = Attempt(run, directory, optimizer, choice.path, logger, FiniteGuard(run.device, checked_until=start),
                      last_good, show_progress, probe, PathCheck(choice, run.device, run.replicas.writer),
                      StallWatch(cfg.data.ways, cfg.train.meta_batch * cfg.data.ways * cfg.data.queries))
    steps = cfg.train.steps
    try:
        with GracefulStop() as stop, \
                training_bar(start, steps, f"{run.algorithm.name} train", show_progress) as bar:
            if start == 0:  # the learning curve starts before the first step
                attempt.evaluate_during_training(0, bar)
            means = TrainMeans()
            for step in range(start, steps):
                done = step + 1
                decompose = decomposes_at(step, cfg, run.ablation)
                result, labels = attempt.step(step, decompose, stop)
                if attempt.applied:
                    means.add(result)
                if decompose and attempt.applied:
                    attempt.log_decomposition(result, labels, step)
                if due(done, cfg.train.log_every, steps):
                    attempt.log_training(done, result, means, bar)
                    means.restart()
                if due(done, cfg.train.eval_every, steps):
                    attempt.evaluate_during_training(done, bar)
                    means.tick = time.perf_counter()  # evaluation time is not in the seconds per step
                signum = run.replicas.stop_signal(stop)
                if due(done, cfg.train.checkpoint_every, steps) or signum is not None:
                    attempt.checkpoint(done)
                if signum is not None:
                    name = signal.Signals(signum).name
                    raise RunInterrupted(f"stopped by {name} after step {done}; checkpoint: {attempt.last_good}",
                                         signum)
                bar.update(1)
        return attempt.finish(start, began, naming)
    finally:
        logger.close()


HPARAM_METRICS = (tags.accuracy(tags.TEST), tags.accuracy(tags.zeroed(tags.TEST)), tags.accuracy(tags.EVAL))
"""The HPARAMS metrics: the headline final test accuracy (head as trained and zeroed) and
the last evaluation's."""


def final_metrics(final: Evaluation, steps: int, wall_s: float) -> dict[str, float]:
    """``metrics.json``: the final test's scalars (``test_accuracy`` is the headline,
    ``test_accuracy_step_k`` and ``test_ci95_step_k`` per test step, the same for
    ``test_zeroed_*``), ``test_tasks``, ``test_headline_step``, ``steps`` and ``wall_seconds``."""
    metrics = {tags.metric_key(k): v for k, v in final.scalars(tags.TEST).items()}
    metrics.update({tags.HEADLINE_STEP_METRIC: float(final.headline), "steps": float(steps),
                    "wall_seconds": round(wall_s, 1)})
    return metrics


_TRACEBACKS = {"shown": os.environ.get("HYDRA_FULL_ERROR") == "1"}
"""Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``), read before :func:`main`
sets the variable for Hydra."""


def _exit_on(error: BaseException, run_dir: str) -> None:
    """Say ``error`` without a traceback (the resume command too when the run stopped, or when
    storage failed and a checkpoint is there to resume) and exit with its status; with
    ``HYDRA_FULL_ERROR=1`` re-raise it. A run that had started says it through its log (console
    and ``train.log``); a refused or interrupted start prints it and leaves no run directory behind
    (:func:`~bilevel.app.run_dir.discard_unstarted`). A further Ctrl-C meanwhile is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _TRACEBACKS["shown"]:
        raise error
    started = log_started(Path(run_dir))
    stopped = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    if isinstance(error, KeyboardInterrupt):
        message, status = ("interrupted by SIGINT; the run directory keeps its last checkpoint, if any" if started
                           else "interrupted by SIGINT before the run started; nothing was written"), 130
    elif isinstance(error, UnknownAlgorithm):  # the registry names its plugins; the catalog adds the presets
        message, status = unknown_algorithm_message(error.name, error.key), error.exit_code
    else:
        message, status = str(error), error.exit_code
    lines = [message if stopped else f"error: {message}"]
    if started and (stopped or (isinstance(error, StorageError) and latest_checkpoint(run_dir) is not None)):
        lines.append("resume with: " + resume_command(HydraConfig.get().overrides.task, run_dir))
    if started:
        log.error("\n".join(lines))
    else:
        print("\n".join(lines), file=sys.stderr, flush=True)
    if not started and detect_launch().writer:  # one process removes it, or they race
        discard_unstarted(run_dir, os.getcwd())
    sys.exit(status)


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, run_dir, naming=hydra_naming())
    except (BilevelError, KeyboardInterrupt) as error:
        _exit_on(error, run_dir)
    except OSError as error:  # the disk, the file system or a path under the run: a fault, not a bug
        _exit_on(storage_error(error), run_dir)
    return metrics.get("test_accuracy")


def main() -> None:
    """Console entry point ``bilevel-train``. Runs under the page-retaining allocator
    (:mod:`bilevel.execution.allocator`) unless ``BILEVEL_ALLOCATOR=default``. Hydra's refusals of the
    command line (:mod:`bilevel.app.cli_errors`) are printed as one paragraph, exit status 2, and so
    is a run directory Hydra cannot make; Ctrl-C before the run starts exits 130 without a
    traceback. Output to a console whose reader has gone is dropped (:mod:`bilevel.app.streams`)."""
    survive_closed_console()
    ensure_allocator(os.environ.get("BILEVEL_ALLOCATOR", "retain"), ["-m", "bilevel.app.train"] + sys.argv[1:])
    _TRACEBACKS["shown"] = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its failures to us instead of printing them
    try:
        check_command_line(sys.argv[1:])
        check_overrides(override_words(sys.argv[1:]))
        register_configs()
        _hydra_main()
    except KeyboardInterrupt:
        if _TRACEBACKS["shown"]:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted by SIGINT before the run started; nothing was written", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001  (explained or re-raised)
        explained = None if _TRACEBACKS["shown"] else (
            error if isinstance(error, ConfigError) else explain(error, override_words(sys.argv[1:]))
            or (explain_os_error(error) if isinstance(error, OSError) else None))
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr, flush=True)
        sys.exit(explained.exit_code)


if __name__ == "__main__":
    main()
