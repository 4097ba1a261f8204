"""bilevel: min-min bi-level learning with exact contrastive / interference decomposition.

The layers, top to bottom (a module imports only its own layer and those below it; the
contract is in ``pyproject.toml`` and checked by ``lint-imports``, docs/architecture.md):

- ``bilevel.app`` — the Hydra trainer (``bilevel-train``): config, logging, checkpoints,
  evaluation, the run's execution choice, distributed runs; ``bilevel.report`` — the offline
  report (``bilevel-report``), which reads run directories and imports nothing of the trainer;
- ``bilevel.engine`` — the engine tier of the API (below);
- ``bilevel.hypergrad`` — the hypergradient rules: unrolled (``UnrolledAlgorithm``), implicit
  (``ImplicitAlgorithm``, exact at any CG budget), chain (``ChainAlgorithm``), the
  node-pullback rows they share, the base of the rules around an inner solver
  (``InnerLoopAlgorithm``) and the memory strategies (``memory=store|recompute[:K]``);
- ``bilevel.execution`` — how the tasks of a meta-batch run (vmap / loop / shared), memory
  estimates;
- ``bilevel.algorithm`` — the plugin interface (``BilevelAlgorithm``) and the registry
  (entry-point group ``bilevel.algorithms``; the engine imports no plugin);
- ``bilevel.decomposition`` — the step protocol (``Want``, ``TaskResult``, ``MetaStep``), the
  terms' node cotangents, the one assembly of a meta-step, the identity and reconstruction
  checks, ablation, terms zero by construction;
- ``bilevel.solvers`` — the inner-loop contract (``Support``, ``InnerConfig``, ``InnerResult``)
  and inner solvers built from the head primitives: small steps chained into update rules (SGD,
  momentum, proximal pull, learned rates), SGD/Langevin chains, proximal solves;
- ``bilevel.primitives`` — parameter dicts, the head and its trace (eq. (1) of docs/theory.md),
  losses, conjugate gradient (and its fixed polynomial), pooling, models; ``bilevel.data`` —
  data sets and the task sampler;
- ``bilevel.validate``; ``bilevel.files``, ``bilevel.rng``, ``bilevel.run_files``,
  ``bilevel.tags``; ``bilevel.errors``.

Two tiers of API. ``bilevel`` (this module) exports what users and plugin authors need: the
bases and their configs, the inner-loop contract (``Support``, ``InnerConfig``, ``InnerResult``)
and the inner steps (``proximal``, ``momentum``, ``rate``, ``learned_rates``, ``frozen_head``,
``chain_steps``, ``descend``), the head primitives, losses, parameter roles, the step protocol,
the checks and errors; every plugin imports from it alone. ``bilevel.engine`` exports what the
bases are built from — the node-pullback rows, the implicit and chain internals, the recompute
sweep, the encoder pullbacks — for writing a new hypergradient rule or testing the engine.
"""
import importlib
from typing import Any

from bilevel.decomposition.ablation import Ablation, resolve_ablation
from bilevel.algorithm import (
    AlgorithmConfig,
    BilevelAlgorithm,
    available_algorithms,
    build_algorithm,
    get_algorithm,
    register,
)
from bilevel.hypergrad.chain import ChainAlgorithm, ChainConfig
from bilevel.solvers.chain import ChainSpec, draw_noise
from bilevel.decomposition.cotangents import TERMS
from bilevel.decomposition.record import Decomposition
from bilevel.data.batch import TaskBatch, task_position
from bilevel.errors import (
    BilevelError,
    ConfigError,
    CorruptFileError,
    DistributedError,
    NonFiniteError,
    ResumeError,
    RunDirectoryBusy,
    RunInterrupted,
    StorageError,
    UnknownAlgorithm,
)
from bilevel.execution.mapping import choose_execution, map_tasks
from bilevel.primitives.head import (
    HeadState,
    HeadTrace,
    head_add_noise,
    head_adjust,
    head_displacement,
    head_shrink,
    head_write,
    init_head,
    readout,
    reconstruct_logits,
)
from bilevel.decomposition.assembly import assemble, mean_over_tasks
from bilevel.decomposition.step import MetaStep, TaskResult, Want
from bilevel.hypergrad.implicit import ImplicitAlgorithm, ImplicitSystem
from bilevel.hypergrad.inner import InnerLoopAlgorithm
from bilevel.solvers.proximal import proximal_solve
from bilevel.solvers.sgd import sgd, sgd_steps
from bilevel.solvers.steps import (
    Direction,
    InnerStep,
    Point,
    chain_steps,
    descend,
    frozen_head,
    learned_rates,
    momentum,
    proximal,
    rate,
)
from bilevel.solvers.support import ADAPTED_SETS, ORDERS, InnerConfig, InnerResult, Support
from bilevel.primitives.batchnorm import SetBatchNorm, forwarding_layout, with_set_statistics
from bilevel.primitives.models import BilevelModel, ModelConfig, build_model, feature_size
from bilevel.primitives.resnet12 import ResNet12
from bilevel.primitives.dropblock import DropBlock, drop_masks, mask_key
from bilevel.primitives.pooling import max_pool2x2
from bilevel.primitives.losses import accuracy, cross_entropy, cross_entropy_logits_grad
from bilevel.primitives.params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, tree_detach
from bilevel.primitives.precision import PRECISIONS, Policy, mixed_precision
from bilevel.decomposition.structural import structural_zeros
from bilevel.hypergrad.unrolled import UnrolledAlgorithm, UnrolledConfig
from bilevel.validate import AT_LEAST_1, INNER_LOOP, NON_NEGATIVE, POSITIVE, Check, OneOf, Range, check_declared, parse_memory

__all__ = [
    "Ablation", "resolve_ablation", "AlgorithmConfig", "BilevelAlgorithm", "MetaStep",
    "available_algorithms", "build_algorithm", "get_algorithm", "register",
    "ChainAlgorithm", "ChainConfig", "ChainSpec", "TERMS", "Decomposition",
    "TaskResult", "Want", "assemble", "mean_over_tasks",
    "ImplicitAlgorithm", "ImplicitSystem", "InnerLoopAlgorithm", "Launch", "Replicas", "detect_launch", "task_share",
    "choose_execution", "map_tasks",
    "HeadState", "HeadTrace", "head_add_noise", "head_adjust", "head_displacement", "head_shrink", "head_write", "init_head",
    "readout", "reconstruct_logits", "BilevelModel", "ModelConfig", "build_model", "max_pool2x2",
    # the inner-loop contract and the inner steps a solver is chained from
    "ADAPTED_SETS", "ORDERS", "InnerConfig", "InnerResult", "Support", "Direction", "InnerStep", "Point", "chain_steps",
    "descend", "frozen_head", "learned_rates", "momentum", "proximal", "rate", "sgd", "sgd_steps", "proximal_solve",
    "PRECISIONS", "Policy", "mixed_precision",
    "Params", "UnrolledAlgorithm", "UnrolledConfig", "parse_memory",
    "BilevelError", "ConfigError", "CorruptFileError", "DistributedError", "NonFiniteError", "ResumeError", "RunDirectoryBusy",
    "StorageError", "RunInterrupted", "UnknownAlgorithm", "AT_LEAST_1", "INNER_LOOP", "NON_NEGATIVE", "POSITIVE", "Check", "OneOf",
    "Range",
    "check_declared", "algorithm_choices", "Evaluation", "TaskSet", "TaskSetSpec", "ci95", "headline_step", "structural_zeros",
    # what plugins read besides the bases: parameter roles, batches, losses, noise draws
    "ENCODER_PREFIX", "HEAD_BIAS", "HEAD_WEIGHT", "TaskBatch", "accuracy", "cross_entropy",
    "cross_entropy_logits_grad", "draw_noise", "encoder_part", "task_position", "tree_detach",
    "ResNet12", "SetBatchNorm", "feature_size", "forwarding_layout", "with_set_statistics",
    "DropBlock", "drop_masks", "mask_key",
]

_APP_NAMES = {
    "algorithm_choices": "bilevel.app.config.catalog",
    "Launch": "bilevel.app.distributed.launch",
    "Replicas": "bilevel.app.distributed.replicas",
    "detect_launch": "bilevel.app.distributed.launch",
    "task_share": "bilevel.app.distributed.launch",
    "Evaluation": "bilevel.app.evaluation",
    "TaskSet": "bilevel.app.evaluation",
    "TaskSetSpec": "bilevel.app.evaluation",
    "ci95": "bilevel.app.evaluation",
    "headline_step": "bilevel.app.evaluation",
}
"""Names of the app layer, imported on first use so that ``import bilevel`` does not load Hydra."""


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        return getattr(importlib.import_module(_APP_NAMES[name]), name)
    raise AttributeError(f"module 'bilevel' has no attribute {name!r}")
