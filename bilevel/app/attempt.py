"""One attempt of a run, from its first step to its final test (:class:`Attempt`): each outer step,
its logging, the evaluations, the checkpoints (:func:`run_state`, read back by :func:`restore`)
and the end — the final test, ``metrics.json`` (written last: only a finished run has one) and
the run's summary (:mod:`bilevel.app.summary`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from bilevel import tags
from bilevel.algorithm import MetaStep
from bilevel.app.config.naming import Naming
from bilevel.app.cosine_protocol import CosineProbe
from bilevel.app.distributed.replicas import GatheredLabels, Quiet
from bilevel.app.evaluation import Evaluation, TaskSet, evaluate
from bilevel.app.execution_choice import PathCheck
from bilevel.app.finite import FiniteGuard, step_tensors
from bilevel.app.head_policy import before_outer_step
from bilevel.app.lifecycle.checkpoint import LATEST, save_checkpoint
from bilevel.app.lifecycle.console import log_file
from bilevel.app.lifecycle.resume import fingerprint
from bilevel.app.lifecycle.run_dir import RunDirectory
from bilevel.app.lifecycle.signals import GracefulStop
from bilevel.app.progress import phase_bar
from bilevel.app.setup import Run
from bilevel.app.stalls import StallWatch
from bilevel.app.summary import Places, Timing, evaluation_line, identity_line, run_summary, run_title
from bilevel.app.tb.logger import RunLogger
from bilevel.data import TaskBatch
from bilevel.primitives.dropblock import drop_masks, mask_key
from bilevel.primitives.head import row_spread
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, tree_norm
from bilevel.rng import global_rng_state, set_global_rng_state
from bilevel.run_files import flatten

log = logging.getLogger(__name__)


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


def title(run: Run, naming: Naming) -> str:
    """What the run trains, as its first and last lines say it (the preset asked for, the ablation)."""
    return run_title(run.cfg, run.algorithm, run.ablation, dict(naming.choices).get("algorithm", ""))


Labels = Optional[TaskBatch | GatheredLabels]
"""The labels of a whole meta-batch (:meth:`~bilevel.app.distributed.replicas.Replicas.reduce_step`): the batch
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
    the outer optimiser, the settled execution ``path``, the logger, the ``start`` step (0, or
    the resumed checkpoint's), the non-finite guard, the last good checkpoint (as messages name
    it) and the seconds spent evaluating."""

    run: Run
    directory: RunDirectory | Quiet
    optimizer: torch.optim.Optimizer
    path: str
    logger: RunLogger | Quiet
    start: int
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
        processes, and apply the update. Returns the whole
        meta-batch's meta-step and labels (:meth:`~bilevel.app.distributed.replicas.Replicas.reduce_step`).
        Under fp16 a step whose meta-gradient is not finite is skipped (``applied`` False:
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

    def finish(self, began: float, naming: Naming) -> dict[str, float]:
        """The final test, the HPARAMS entry and ``metrics.json`` (written last: only a finished
        run has one), then the run's summary. Returns the final metrics."""
        run, cfg = self.run, self.run.cfg
        final = self.evaluate(run.test_tasks, cfg.train.steps, tags.TEST, f"final test ({cfg.eval.final_split})")
        metrics = final_metrics(final, cfg.train.steps, time.perf_counter() - began)
        self.logger.hparams({**dict(naming.choices), **flatten(OmegaConf.to_container(cfg, resolve=True))},
                            naming.swept, HPARAM_METRICS, naming.trial_id, sweep=bool(naming.sweep_dir))
        self.directory.write_metrics(metrics)
        if run.replicas.writer:
            timing = Timing(self.start, cfg.train.steps, time.perf_counter() - began, self.eval_seconds)
            places = Places(self.directory.path.resolve(), log_file(self.directory.path),
                            Path(self.logger.writer.log_dir).resolve().parent, naming.sweep_dir)
            log.info(run_summary(title(run, naming), final, cfg.eval.final_split, cfg.data.ways, timing, places))
        return metrics
