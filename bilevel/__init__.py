"""bilevel: min-min bi-level learning with exact contrastive / interference decomposition.

The layers, top to bottom (a module imports only its own layer and those below it; the
contract is in ``pyproject.toml`` and checked by ``lint-imports``, docs/architecture.md):

- ``bilevel.app`` — the Hydra trainer (``bilevel-train``), config, logging, checkpoints,
  evaluation, the run's execution choice, distributed runs, the report (``bilevel-report``);
- ``bilevel.hypergrad`` — the hypergradient rules: unrolled (``UnrolledAlgorithm``), implicit
  (``ImplicitAlgorithm``, exact at any CG budget), chain (``ChainAlgorithm``), the
  node-pullback rows they share, and the memory strategies (``memory=store|recompute[:K]``);
- ``bilevel.execution`` — how the tasks of a meta-batch run (vmap / loop / shared), memory
  estimates;
- ``bilevel.algorithm`` — the plugin interface (``BilevelAlgorithm``) and the registry
  (entry-point group ``bilevel.algorithms``; the engine imports no plugin);
- ``bilevel.decomposition`` — the step protocol (``Want``, ``TaskResult``, ``MetaStep``), the
  terms' node cotangents, the one assembly of a meta-step, the identity and reconstruction
  checks, ablation, terms zero by construction;
- ``bilevel.solvers`` — inner solvers built from the head primitives: SGD steps (momentum,
  proximal), SGD/Langevin chains, proximal solves;
- ``bilevel.primitives`` — parameter dicts, the head and its trace (eq. (1) of docs/theory.md),
  losses, conjugate gradient (and its fixed polynomial), pooling, models; ``bilevel.data`` —
  data sets and the task sampler;
- ``bilevel.validate``; ``bilevel.files``, ``bilevel.rng``, ``bilevel.tags``; ``bilevel.errors``.

Everything a plugin needs is re-exported here.
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
from bilevel.primitives.cg import CGResult, cg_polynomial, conjugate_gradient
from bilevel.hypergrad.chain import ChainAlgorithm, ChainConfig, decompose_chain
from bilevel.solvers.chain import ChainSpec, draw_noise, run_chain
from bilevel.decomposition.cotangents import TERMS, Nodes, stack_nodes, sum_nodes, term_cotangents
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
from bilevel.execution.mapping import choose_execution, map_meta_steps, map_tasks
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
from bilevel.hypergrad.recompute import Steps, autograd_vjp, recompute_vjp
from bilevel.hypergrad.rows import Forward, ablated_row, node_rows, plain_row, term_rows
from bilevel.decomposition.assembly import assemble, mean_over_tasks
from bilevel.decomposition.step import MetaStep, TaskResult, Want
from bilevel.hypergrad.implicit import (
    ImplicitAlgorithm,
    ImplicitSystem,
    implicit_task,
    implicit_vjp,
    linearize_stationarity,
    solve_error,
    stationarity_residual,
)
from bilevel.solvers.proximal import proximal_solve
from bilevel.solvers.sgd import InnerResult, autograd_pullbacks, encoder_pullback, sgd_steps
from bilevel.primitives.batchnorm import SetBatchNorm, forwarding_layout, with_set_statistics
from bilevel.primitives.models import BilevelModel, ModelConfig, build_model, feature_size
from bilevel.primitives.resnet12 import ResNet12
from bilevel.primitives.dropblock import DropBlock, drop_masks, mask_key
from bilevel.primitives.pooling import max_pool2x2
from bilevel.primitives.losses import accuracy, cross_entropy, cross_entropy_logits_grad
from bilevel.primitives.params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, tree_detach
from bilevel.primitives.precision import PRECISIONS, Policy, mixed_precision
from bilevel.decomposition.structural import structural_zeros
from bilevel.hypergrad.unrolled import ORDERS, UnrolledAlgorithm, UnrolledConfig
from bilevel.validate import AT_LEAST_1, INNER_LOOP, NON_NEGATIVE, POSITIVE, Check, OneOf, Range, check_declared, parse_memory

__all__ = [
    "Ablation", "resolve_ablation", "AlgorithmConfig", "BilevelAlgorithm", "MetaStep",
    "available_algorithms", "build_algorithm", "get_algorithm", "register", "CGResult",
    "cg_polynomial", "conjugate_gradient", "ChainAlgorithm", "ChainConfig", "ChainSpec", "decompose_chain", "run_chain",
    "TERMS", "Decomposition", "Nodes", "stack_nodes", "sum_nodes", "term_cotangents",
    "Forward", "TaskResult", "Want", "ablated_row", "assemble", "mean_over_tasks", "node_rows", "plain_row", "term_rows",
    "ImplicitAlgorithm", "ImplicitSystem", "implicit_task", "solve_error", "Launch", "Replicas", "detect_launch", "task_share",
    "choose_execution", "map_meta_steps", "map_tasks",
    "HeadState", "HeadTrace", "head_add_noise", "head_adjust", "head_displacement", "head_shrink", "head_write", "init_head",
    "readout", "reconstruct_logits", "implicit_vjp", "linearize_stationarity", "proximal_solve",
    "stationarity_residual", "InnerResult", "autograd_pullbacks", "encoder_pullback", "sgd_steps", "BilevelModel", "ModelConfig", "build_model", "max_pool2x2",
    "PRECISIONS", "Policy", "mixed_precision",
    "Params", "UnrolledAlgorithm", "UnrolledConfig", "Steps", "autograd_vjp", "parse_memory", "recompute_vjp",
    "BilevelError", "ConfigError", "CorruptFileError", "DistributedError", "NonFiniteError", "ResumeError", "RunDirectoryBusy",
    "StorageError", "RunInterrupted", "UnknownAlgorithm", "AT_LEAST_1", "INNER_LOOP", "NON_NEGATIVE", "POSITIVE", "Check", "OneOf",
    "Range",
    "check_declared", "algorithm_choices", "Evaluation", "TaskSet", "ci95", "headline_step", "structural_zeros",
    # what plugins read besides the bases: parameter roles, batches, losses, noise draws
    "ENCODER_PREFIX", "HEAD_BIAS", "HEAD_WEIGHT", "ORDERS", "TaskBatch", "accuracy", "cross_entropy",
    "cross_entropy_logits_grad", "draw_noise", "encoder_part", "task_position", "tree_detach",
    "ResNet12", "SetBatchNorm", "feature_size", "forwarding_layout", "with_set_statistics",
    "DropBlock", "drop_masks", "mask_key",
]

_APP_NAMES = {
    "algorithm_choices": "bilevel.app.catalog",
    "Launch": "bilevel.app.distributed",
    "Replicas": "bilevel.app.distributed",
    "detect_launch": "bilevel.app.distributed",
    "task_share": "bilevel.app.distributed",
    "Evaluation": "bilevel.app.evaluation",
    "TaskSet": "bilevel.app.evaluation",
    "ci95": "bilevel.app.evaluation",
    "headline_step": "bilevel.app.evaluation",
}
"""Names of the app layer, imported on first use so that ``import bilevel`` does not load Hydra."""


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        return getattr(importlib.import_module(_APP_NAMES[name]), name)
    raise AttributeError(f"module 'bilevel' has no attribute {name!r}")
