"""bilevel: min-min bi-level learning with exact contrastive / interference decomposition.

The public API: models and parameters, the head primitives that record the trace
(eq. (1) of docs/theory.md), the inner solvers (SGD/momentum/proximal, Langevin chains, proximal
solves with implicit differentiation), the algorithm base class and registry, the
decomposition, ablation, and execution helpers, the terms that vanish by construction, the
evaluation protocol (fixed task prefix, time budget, 95 % CIs), the one list of algorithms, the
declarative config checks plugins use (``Range``, ``OneOf``, ...), the actionable errors with
their exit statuses, and the pieces of a run over many processes (``Launch``, ``Replicas``,
``detect_launch``, ``task_share``). ``bilevel.data``
holds the data sets and the task sampler; ``bilevel.train`` the Hydra training app;
``bilevel.report`` the run report.
"""
from .ablation import Ablation, resolve_ablation
from .algorithm import (
    AlgorithmConfig,
    BilevelAlgorithm,
    available_algorithms,
    build_algorithm,
    get_algorithm,
    register,
)
from .catalog import algorithm_choices
from .cg import CGResult, cg_polynomial, conjugate_gradient
from .chain import ChainAlgorithm, ChainConfig, ChainSpec, decompose_chain, run_chain
from .decompose import TERMS, Decomposition, Nodes, stack_nodes, sum_nodes, term_cotangents
from .distributed import Launch, Replicas, detect_launch, task_share
from .errors import (
    BilevelError,
    ConfigError,
    CorruptFileError,
    DistributedError,
    NonFiniteError,
    ResumeError,
    RunDirectoryBusy,
    RunInterrupted,
)
from .evaluation import Evaluation, TaskSet, ci95, headline_step
from .execution import choose_execution, map_meta_steps, map_tasks
from .head import (
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
from .hypergradient import (
    Forward,
    MetaStep,
    TaskResult,
    Want,
    ablated_row,
    assemble,
    mean_over_tasks,
    node_rows,
    plain_row,
    term_rows,
)
from .implicit import (
    ImplicitAlgorithm,
    ImplicitSystem,
    implicit_task,
    implicit_vjp,
    linearize_stationarity,
    proximal_solve,
    solve_error,
    stationarity_residual,
)
from .inner import InnerResult, autograd_pullbacks, encoder_pullback, sgd_steps
from .models import BilevelModel, ModelConfig, build_model
from .pooling import max_pool2x2
from .params import Params
from .structural import structural_zeros
from .unrolled import UnrolledAlgorithm, UnrolledConfig
from .validate import AT_LEAST_1, INNER_LOOP, NON_NEGATIVE, POSITIVE, Check, OneOf, Range, check_declared

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
    "Params", "UnrolledAlgorithm", "UnrolledConfig",
    "BilevelError", "ConfigError", "CorruptFileError", "DistributedError", "NonFiniteError", "ResumeError", "RunDirectoryBusy",
    "RunInterrupted", "AT_LEAST_1", "INNER_LOOP", "NON_NEGATIVE", "POSITIVE", "Check", "OneOf", "Range",
    "check_declared", "algorithm_choices", "Evaluation", "TaskSet", "ci95", "headline_step", "structural_zeros",
]
