"""The training app: ``bilevel-train`` / ``python -m bilevel.app.train`` (Hydra): :func:`main`, and
the training loop of an attempt (:func:`train`).

A run, in order (``docs/reliability.md`` states what is guaranteed):

1. :func:`~bilevel.app.setup.setup` validates everything before any work — schema keys and
   declared ranges, algorithm and options, ablation terms, data shapes and directories, device,
   and a memory estimate of one meta-step — and builds data, model and algorithm.
2. :func:`train` takes the run directory (:mod:`bilevel.app.lifecycle.run_dir`: lock, stale
   temporary files) and starts the attempt (:mod:`bilevel.app.start`): it reads the checkpoint
   and checks the resume contract (:mod:`bilevel.app.lifecycle.resume`), settles the execution path
   (:mod:`bilevel.app.execution_choice`), and only then writes ``config.yaml``. Each step is
   :meth:`~bilevel.app.attempt.Attempt.step`, its logging
   :meth:`~bilevel.app.attempt.Attempt.log_training` / :meth:`~bilevel.app.attempt.Attempt.log_decomposition`,
   the evaluations :meth:`~bilevel.app.attempt.Attempt.evaluate_during_training`, the checkpoints
   :meth:`~bilevel.app.attempt.Attempt.checkpoint`, the end :meth:`~bilevel.app.attempt.Attempt.finish`.
3. Every step is watched for non-finite values (:mod:`bilevel.app.finite`); a checkpoint (the last
   two kept, :mod:`bilevel.app.lifecycle.checkpoint`) holds every random state of the run;
   SIGINT/SIGTERM finish the step, checkpoint and stop (:mod:`bilevel.app.lifecycle.signals`).
   Evaluations (:mod:`bilevel.app.evaluation`: a fixed task prefix within a time budget, accuracy
   after every test step with 95 % CIs) run every ``train.eval_every`` steps and once at the end,
   each with its own progress bar (:mod:`bilevel.app.progress`); TensorBoard: :mod:`bilevel.app.tb`.
4. ``metrics.json`` is written last, only by a run that finished, which then prints its summary
   (:mod:`bilevel.app.summary`). What the console shows goes to ``train.log`` too
   (:mod:`bilevel.app.lifecycle.console`).

Under ``torchrun`` the run spans its processes (:mod:`bilevel.app.distributed`): each draws its share
of every meta-batch and of every evaluation batch, one collective per step reduces the
meta-step, and rank 0 alone writes (the run directory, TensorBoard, ``train.log``).

The CLI prints the failures of :mod:`bilevel.errors`, and Hydra's refusals of a command line
(:mod:`bilevel.app.config.cli_errors`), without a traceback, with their exit status (2 for a
configuration error, 130/143 for SIGINT/SIGTERM, else 1) and, when a run stopped, the command
that resumes it; a refused start leaves no run directory behind (:mod:`bilevel.app.exits`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bilevel.app.attempt import TrainMeans
from bilevel.app.config.cli_errors import check_overrides, explain, explain_os_error, override_words
from bilevel.app.config.naming import Naming, hydra_naming
from bilevel.app.config.schema import register_configs
from bilevel.app.distributed.launch import check_command_line
from bilevel.app.distributed.replicas import Quiet
from bilevel.app.exits import TRACEBACKS, exit_on
from bilevel.app.lifecycle.console import silence_run_log
from bilevel.app.lifecycle.run_dir import RunDirectory
from bilevel.app.lifecycle.signals import GracefulStop
from bilevel.app.lifecycle.streams import survive_closed_console
from bilevel.app.progress import training_bar
from bilevel.app.setup import Run, setup
from bilevel.app.start import start_attempt
from bilevel.decomposition.ablation import Ablation
from bilevel.errors import BilevelError, ConfigError, RunInterrupted
from bilevel.execution.allocator import ensure_allocator
from bilevel.files import storage_error
from bilevel.primitives.precision import mixed_precision


def train(cfg: Any, run_dir: str | Path, show_progress: bool = True, naming: Optional[Naming] = None) -> dict[str, float]:
    """Run meta-training in ``run_dir``; returns the final metrics (``metrics.json``)."""
    run = setup(cfg)
    if not run.replicas.writer:
        silence_run_log(Path(run_dir))
    with run.replicas.running(run_dir) as directory, mixed_precision(run.cfg.precision, run.loss_scale):
        return _train(run, directory, show_progress and run.replicas.writer, naming or Naming(run.algorithm.name))


def _train(run: Run, directory: RunDirectory | Quiet, show_progress: bool, naming: Naming) -> dict[str, float]:
    """The training loop of one attempt (the module docstring's steps 2–4)."""
    cfg = run.cfg
    began = time.perf_counter()
    attempt = start_attempt(run, directory, show_progress, naming)
    start, logger = attempt.start, attempt.logger
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
        return attempt.finish(began, naming)
    finally:
        logger.close()


def due(done: int, every: int, steps: int) -> bool:
    """Whether an action taken every ``every`` steps is due after ``done`` steps: it is also
    taken after the last one."""
    return done % every == 0 or done == steps


def decomposes_at(step: int, cfg: DictConfig, ablation: Ablation) -> bool:
    """Whether outer step ``step`` (from 0) computes and logs the decomposition: every
    ``train.decompose_every`` steps from step 0 (0: never) and, in a run without an ablation, the
    last step too (with an ablation a decomposition step takes the encoder's update from the
    decomposition, so an extra one would change the trajectory: :data:`bilevel.app.lifecycle.resume.FORCEABLE`)."""
    every = cfg.train.decompose_every
    return every > 0 and (step % every == 0 or (step + 1 == cfg.train.steps and ablation.plain))


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, run_dir, naming=hydra_naming())
    except (BilevelError, KeyboardInterrupt) as error:
        exit_on(error, run_dir)
    except OSError as error:  # the disk, the file system or a path under the run: a fault, not a bug
        exit_on(storage_error(error), run_dir)
    return metrics.get("test_accuracy")


def main() -> None:
    """Console entry point ``bilevel-train``. Runs under the page-retaining allocator
    (:mod:`bilevel.execution.allocator`) unless ``BILEVEL_ALLOCATOR=default``. Hydra's refusals of the
    command line (:mod:`bilevel.app.config.cli_errors`) are printed as one paragraph, exit status 2, and so
    is a run directory Hydra cannot make; Ctrl-C before the run starts exits 130 without a
    traceback. Output to a console whose reader has gone is dropped (:mod:`bilevel.app.lifecycle.streams`)."""
    survive_closed_console()
    ensure_allocator(os.environ.get("BILEVEL_ALLOCATOR", "retain"), ["-m", "bilevel.app.train"] + sys.argv[1:])
    TRACEBACKS["shown"] = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its failures to us instead of printing them
    try:
        check_command_line(sys.argv[1:])
        check_overrides(override_words(sys.argv[1:]))
        register_configs()
        _hydra_main()
    except KeyboardInterrupt:
        if TRACEBACKS["shown"]:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted by SIGINT before the run started; nothing was written", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001  (explained or re-raised)
        explained = None if TRACEBACKS["shown"] else (
            error if isinstance(error, ConfigError) else explain(error, override_words(sys.argv[1:]))
            or (explain_os_error(error) if isinstance(error, OSError) else None))
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr, flush=True)
        sys.exit(explained.exit_code)


if __name__ == "__main__":
    main()
