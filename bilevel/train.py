"""The training app: ``bilevel-train`` / ``python -m bilevel.train`` (Hydra).

Everything is validated before the first step (config keys, types and declared ranges,
algorithm name and options, ablation terms, data shapes and directories, device, a memory
estimate of one meta-step); a refusal is a :class:`~bilevel.errors.ConfigError`, which the
CLI prints without a traceback, exiting 2. Each run directory holds
the resolved config, TensorBoard events (``tb/``), ``checkpoint.pt`` and ``checkpoint.prev.pt``
(the last two, atomic and checksummed: :mod:`bilevel.checkpoint`) and ``metrics.json``. A
non-finite meta-loss stops the run with a message; the last good checkpoint is kept.
"""
from __future__ import annotations

import json
import math
import os
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
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEVICES, register_configs, typed_config, validate
from .data import TaskBatch, TaskSampler, build_sampler, input_shape
from .errors import ConfigError
from .execution import choose_execution
from .files import atomic_write_text
from .head_policy import before_outer_step, initialise_head, zeroed_head
from .memory import check_meta_step_memory
from .models import BilevelModel, build_model
from .params import HEAD_BIAS, HEAD_WEIGHT, Params, tree_norm
from .tb import RunLogger


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


def eval_batches(cfg: DictConfig, split: str, tasks: int, device, dtype) -> list[TaskBatch]:
    """A fixed set of ``tasks`` evaluation tasks (same seed every time), in meta-batches."""
    size = min(cfg.train.meta_batch * 4, tasks)
    sampler = build_sampler(cfg.data, split, size, seed=cfg.seed + 10_000)
    return [sampler.sample().to(device, dtype) for _ in range(math.ceil(tasks / size))]


def setup(cfg: Any) -> Run:
    """Validate the configuration and build the run (data, model, algorithm, ablation).

    Every refusal is a :class:`~bilevel.errors.ConfigError` raised before any work: the
    schema's keys and checks, then whatever building data, model and algorithm refuses
    (their ``ValueError``s say which key to change), then the memory estimate."""
    cfg = typed_config(cfg)
    validate(cfg)
    try:
        device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        shape = input_shape(cfg.data)
        model = build_model(cfg.model, shape, cfg.data.ways)
        algorithm = build_algorithm(cfg.algorithm, model)
        check_meta_step_memory(model, shape, cfg, algorithm.config, algorithm.train_steps, device, dtype)
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
        sampler = build_sampler(cfg.data, "train", cfg.train.meta_batch, seed=cfg.seed)
        evals = eval_batches(cfg, cfg.eval.split, cfg.eval.tasks, device, dtype)
    except (ValueError, FileNotFoundError) as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err
    return Run(cfg, device, dtype, model, params, algorithm, ablation, sampler, evals)


def evaluate(algorithm: BilevelAlgorithm, params: Params, batches: list[TaskBatch], zero_head: bool) -> torch.Tensor:
    """Mean query accuracy after 0 … test_steps inner steps over the fixed task set."""
    p = zeroed_head(params) if zero_head else params
    accs = [algorithm.evaluate(p, b, algorithm.eval_steps) for b in batches]
    return torch.stack(accs).mean(0)


def eval_scalars(prefix: str, accs: torch.Tensor) -> dict[str, float]:
    values = {f"{prefix}/accuracy": float(accs[-1])}
    values.update({f"{prefix}/accuracy_step_{i}": float(a) for i, a in enumerate(accs)})
    return values


class NonFiniteLoss(FloatingPointError):
    """The meta-loss became NaN/inf; the message names the last good checkpoint."""


def train(cfg: Any, run_dir: str | Path, show_progress: bool = True) -> dict[str, float]:
    """Run meta-training in ``run_dir``; returns the final metrics."""
    run = setup(cfg)
    cfg, params, algorithm = run.cfg, run.params, run.algorithm
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg), run_dir / "config.yaml")
    ckpt_path = run_dir / "checkpoint.pt"
    optimizer = algorithm.make_outer_optimizer(list(params.values()), cfg.train.lr)
    start, last_good = 0, None
    if cfg.train.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, run.device)
        for k, v in state["params"].items():
            params[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        algorithm.load_state_dict(state["algorithm"])
        run.sampler.load_state_dict(state["sampler"])
        start = last_good = state["step"]

    first = run.sampler.sample().to(run.device, run.dtype)
    if cfg.execution == "auto" and len(algorithm.executions) > 1:
        def attempt(mode: str) -> None:
            algorithm.execution = mode
            algorithm.meta_grad(params, first)
        chosen, timings = choose_execution(attempt, algorithm.executions, run.device)
        algorithm.execution = chosen
        print(f"execution=auto chose {chosen!r}: " + ", ".join(f"{m} {t * 1e3:.1f} ms" for m, t in timings.items()))
    elif cfg.execution != "auto":
        algorithm.execution = cfg.execution

    logger = RunLogger(run_dir)
    metrics: dict[str, float] = {}
    bad = torch.zeros((), dtype=torch.bool, device=run.device)
    policy = cfg.head.policy

    def save(step: int) -> None:
        save_checkpoint({
            "step": step, "params": params, "optimizer": optimizer.state_dict(),
            "algorithm": algorithm.state_dict(), "sampler": run.sampler.state_dict(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }, run_dir)

    def log_eval(step: int, split_batches: list[TaskBatch], prefix: str) -> dict[str, float]:
        values = eval_scalars(prefix, evaluate(algorithm, params, split_batches, zero_head=False))
        values.update(eval_scalars(prefix + "_zeroed", evaluate(algorithm, params, split_batches, zero_head=True)))
        logger.scalars(values, step)
        return values

    try:
        bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
                   disable=not show_progress, desc=f"{algorithm.name} train", dynamic_ncols=True)
        tick, loss_sum, acc_sum, count = time.perf_counter(), 0.0, 0.0, 0
        batch = first
        for step in bar:
            if step > start:
                batch = run.sampler.sample().to(run.device, run.dtype)
            before_outer_step(params, policy)
            decompose_now = cfg.train.decompose_every > 0 and step % cfg.train.decompose_every == 0
            result, update = run.ablation.step(algorithm, params, batch, decompose_now)
            for k, p in params.items():
                p.grad = update[k]
            optimizer.step()
            algorithm.outer_step_done()
            bad |= ~torch.isfinite(result.loss)
            loss_sum, acc_sum, count = loss_sum + result.loss.detach(), acc_sum + result.accuracy.detach(), count + 1

            if decompose_now:
                images = cfg.train.image_every > 0 and step % cfg.train.image_every == 0
                logger.decomposition(result.decomposition, batch, step, images)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                if bool(bad):
                    where = f"{ckpt_path} (step {last_good})" if last_good is not None else "none written yet"
                    raise NonFiniteLoss(
                        f"non-finite meta-loss between steps {done - count} and {done}; last good checkpoint: "
                        f"{where}. Lower train.lr or the algorithm's inner_lr, or use dtype=float64."
                    )
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
                values = log_eval(done, run.eval_batches, "eval")
                bar.write(f"step {done}: eval accuracy {values['eval/accuracy']:.3f} "
                          f"(test-time zeroing {values['eval_zeroed/accuracy']:.3f})")
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                if all(bool(torch.isfinite(p).all()) for p in params.values()):
                    save(done)
                    last_good = done
        final = eval_batches(cfg, cfg.eval.final_split, cfg.eval.final_tasks, run.device, run.dtype)
        metrics = {k.replace("/", "_"): v for k, v in log_eval(cfg.train.steps, final, "test").items()}
        metrics["steps"] = float(cfg.train.steps)
        logger.hparams(cfg, metrics)
        atomic_write_text(json.dumps(metrics, indent=2), run_dir / "metrics.json")
    finally:
        logger.close()
    return metrics


@hydra.main(config_path="pkg://configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:  # printed without a traceback; HYDRA_FULL_ERROR=1 shows one, as in Hydra
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    return metrics.get("test_accuracy")


def main() -> None:
    """Console entry point ``bilevel-train``. Runs under the page-retaining allocator
    (:mod:`bilevel.allocator`) unless ``BILEVEL_ALLOCATOR=default``."""
    ensure_allocator(os.environ.get("BILEVEL_ALLOCATOR", "retain"), ["-m", "bilevel.train"] + sys.argv[1:])
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
