"""The start of an attempt, in order: rank 0 finds the checkpoint to resume and settles the execution
path (:func:`begin`, broadcast to every rank), every rank loads the checkpoint (:func:`resume`),
and only then is ``config.yaml`` written and the TensorBoard logger opened (:func:`open_run`);
:func:`start_attempt` does all three and returns the :class:`~bilevel.app.attempt.Attempt`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from bilevel import tags
from bilevel.app.attempt import Attempt, restore, title
from bilevel.app.config.naming import Naming
from bilevel.app.cosine_protocol import CosineProbe
from bilevel.app.distributed.replicas import Quiet
from bilevel.app.execution_choice import ExecutionChoice, PathCheck, cache_key, measure_paths, settle_execution
from bilevel.app.finite import FiniteGuard
from bilevel.app.lifecycle.resume import check_resume, checkpoint_to_resume, fingerprint
from bilevel.app.lifecycle.run_dir import RunDirectory
from bilevel.app.setup import Run
from bilevel.app.stalls import StallWatch
from bilevel.app.tb.logger import RunLogger
from bilevel.execution.memory import budget_words

TRIAL_SEED_OFFSET = 20_000  # the execution measurement's own sampler: seed + this
log = logging.getLogger(__name__)


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


Found = Optional[tuple[Path, dict[str, Any]]]
"""The checkpoint an attempt resumes, and its state (None: a new run)."""


def begin(run: Run, directory: RunDirectory | Quiet) -> tuple[Found, ExecutionChoice]:
    """Rank 0's start of an attempt: the checkpoint to resume
    (:func:`~bilevel.app.lifecycle.resume.checkpoint_to_resume`), the execution path
    (:func:`settle_path`; a resumed run keeps its recorded one) and the resume contract, checked
    against the fingerprint of that path (:func:`~bilevel.app.lifecycle.resume.check_resume`)."""
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


def open_run(run: Run, directory: RunDirectory | Quiet, choice: ExecutionChoice, found: Found, start: int,
             naming: Naming) -> RunLogger | Quiet:
    """Fix the execution path, write ``config.yaml`` (only now, once everything is settled), say
    what the run is, and open its TensorBoard logger (a :class:`~bilevel.app.distributed.replicas.Quiet` on a
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


def start_attempt(run: Run, directory: RunDirectory | Quiet, show_progress: bool, naming: Naming) -> Attempt:
    """Start an attempt of ``run`` in ``directory`` (module docstring): the outer optimiser, the
    resumed or initial state, ``config.yaml`` and the logger, the paper's cosine probe (its step-0
    measurement on a new run), and the attempt's watches (non-finite values, the cached path's
    speed, stalls)."""
    cfg = run.cfg
    optimizer = run.algorithm.make_outer_optimizer(list(run.params.values()), cfg.train.lr)
    found, choice = run.replicas.first(lambda: begin(run, directory))  # rank 0 reads; all continue alike
    start, last_good = resume(run, optimizer, found)
    logger = open_run(run, directory, choice, found, start, naming)
    probe = CosineProbe(cfg.cosine, cfg.data, run.model, directory.path if run.replicas.writer else None,
                        run.device, run.dtype)  # the paper's cosine measurement (cfg.cosine.steps; none: off)
    if start == 0:
        probe.after_update(0, run.params)
    return Attempt(run=run, directory=directory, optimizer=optimizer, path=choice.path, logger=logger, start=start,
                   guard=FiniteGuard(run.device, checked_until=start), last_good=last_good,
                   show_progress=show_progress, probe=probe,
                   path_check=PathCheck(choice, run.device, run.replicas.writer),
                   stalls=StallWatch(cfg.data.ways, cfg.train.meta_batch * cfg.data.ways * cfg.data.queries))
