"""Building a run before any work: :func:`setup` validates the configuration and builds data,
model and algorithm (:class:`Run`).

Every refusal is a :class:`~bilevel.errors.ConfigError` raised before anything is written: the
schema's keys and declared ranges (:mod:`bilevel.app.config.schema`), the launch
(:mod:`bilevel.app.distributed.launch`), then whatever building data, model and algorithm refuses
(their ``ValueError``s say which key to change, :mod:`bilevel.app.config.preflight`), then the
memory estimate of one meta-step (:func:`bilevel.execution.memory.memory_plans`). The order of the
draws is fixed: the global seed is set before the data and the model are built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from bilevel.algorithm import BilevelAlgorithm, build_algorithm
from bilevel.app.config.preflight import check_model, check_outer_lr
from bilevel.app.config.schema import DEVICES, typed_config, validate
from bilevel.app.distributed.launch import (
    Launch, check_launch, detect_launch, rank_device, resolve_backend, tasks_in_memory,
)
from bilevel.app.distributed.replicas import Replicas
from bilevel.app.evaluation import TaskSet, TaskSetSpec, headline_step
from bilevel.app.head_policy import initialise_head
from bilevel.app.loss_scale import DynamicLossScale
from bilevel.data import TaskSampler, build_sampler, input_shape
from bilevel.decomposition.ablation import Ablation, resolve_ablation
from bilevel.decomposition.structural import idle_ablation_warning, structural_zeros
from bilevel.errors import ConfigError
from bilevel.execution.memory import MemoryPlan, memory_plans
from bilevel.files import check_cache_dir
from bilevel.primitives.models import BilevelModel, build_model
from bilevel.primitives.params import Params
from bilevel.primitives.precision import precision_warning


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


def setup(cfg: Any) -> Run:
    """Validate the configuration and build the run (data, model, algorithm, ablation; module docstring)."""
    cfg = typed_config(cfg)
    validate(cfg)
    launch = detect_launch()
    try:
        device, dtype, replicas = _placement(cfg, launch)
        shape, sampler, evals, tests = _tasks(cfg, launch, device, dtype)
        model, algorithm, plans = _algorithm(cfg, launch, shape, device, dtype)
        params = _meta_parameters(cfg, model, algorithm, device, dtype)
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


def _placement(cfg: DictConfig, launch: Launch) -> tuple[torch.device, torch.dtype, Replicas]:
    """The device and dtype of this process, and its :class:`Replicas`; sets the CPU convolution
    kernels (``cpu_conv``); refuses a precision without float32 master parameters, a launch the run
    cannot take, and an unusable cache."""
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    torch.backends.mkldnn.enabled = cfg.cpu_conv == "onednn"
    if cfg.precision != "fp32" and cfg.dtype != "float32":
        raise ConfigError(f"precision={cfg.precision} keeps float32 master parameters; it needs dtype=float32, "
                          f"got dtype={cfg.dtype} (or set precision=fp32)")
    check_launch(launch, cfg, device)
    check_cache_dir()
    device = rank_device(launch, device)
    replicas = Replicas(launch, device, resolve_backend(cfg.dist.backend, device), cfg.dist.timeout_s,
                        cfg.dist.check_every)
    return device, dtype, replicas


def _tasks(cfg: DictConfig, launch: Launch, device: torch.device,
           dtype: torch.dtype) -> tuple[tuple[int, ...], TaskSampler, TaskSet, TaskSet]:
    """Seed the run, then the input shape, this process's share of the training sampler and the
    evaluation and final test task sets (:class:`~bilevel.app.evaluation.TaskSet`: each batch drawn as
    this process's share of it; data directories and classes per split are checked here, before
    the memory estimates)."""
    torch.manual_seed(cfg.seed)
    shape = input_shape(cfg.data)
    sampler = launch.share(build_sampler(cfg.data, "train", cfg.train.meta_batch, seed=cfg.seed))
    evals = TaskSet(cfg.data, TaskSetSpec(cfg.eval.split, cfg.eval.tasks, cfg.eval.batch, cfg.eval.budget_s, cfg.seed),
                    device, dtype, launch.share)
    tests = TaskSet(cfg.data, TaskSetSpec(cfg.eval.final_split, cfg.eval.final_tasks, cfg.eval.batch,
                                          cfg.eval.final_budget_s, cfg.seed), device, dtype, launch.share)
    return shape, sampler, evals, tests


def _algorithm(cfg: DictConfig, launch: Launch, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype) -> tuple[BilevelModel, BilevelAlgorithm, list[MemoryPlan]]:
    """The model (checked on the ``meta`` device first), the algorithm with its execution path and
    memory strategy checked, and the memory plans of one meta-step on this process."""
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
    return model, algorithm, plans


def _meta_parameters(cfg: DictConfig, model: BilevelModel, algorithm: BilevelAlgorithm, device: torch.device,
                     dtype: torch.dtype) -> Params:
    """The model on ``device`` in ``dtype``, its initial parameters with the head policy's head,
    and the algorithm's meta-parameters; refuses a ``train.lr`` the outer optimiser ignores."""
    model.to(device=device, dtype=dtype)
    params = model.init_params()
    initialise_head(params, cfg.head.policy, cfg.head.scale, cfg.head.init)
    params = algorithm.meta_parameters(params)
    check_outer_lr(cfg, algorithm, params)
    return params
