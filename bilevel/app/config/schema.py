"""Typed configuration of a training run (Hydra structured configs).

The schema ``base_train`` is registered in Hydra's ConfigStore; ``configs/train.yaml``
extends it, so a misspelt key or a wrong type fails at composition naming the key.
:func:`validate` then rejects keys added with ``+key=...`` that the schema does not have and
applies every node's declared checks (:mod:`bilevel.validate`: sizes >= 1, rates > 0, choices).
The ``algorithm`` node is validated against the selected plugin's own Config dataclass and
its checks (:func:`bilevel.algorithm.algorithm_config`), so a plugin's keys are checked too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from bilevel.app.config.catalog import register_plugin_presets
from bilevel.app.cosine_protocol import CosineConfig
from bilevel.data import DataConfig
from bilevel.data.dataset import SPLITS
from bilevel.execution.mapping import EXECUTIONS
from bilevel.app.head_policy import HEAD_INITS, HEAD_POLICIES, algorithm_policy
from bilevel.primitives.models import MODELS, ModelConfig
from bilevel.primitives.precision import PRECISIONS
from bilevel.primitives.resnet12 import POOLS
from bilevel.validate import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Check, OneOf, Range, check_declared, reject_unknown_keys

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
CPU_CONVS = ("onednn", "native")
"""``cpu_conv`` values: PyTorch's oneDNN convolution kernels on the CPU (its default, the fastest) or its
native ones (slower; their float32 weight gradients are more accurate on large images)."""
RESUME_MODES = ("auto", "true", "false", "force")
BACKENDS = ("auto", "gloo", "nccl")


OmegaConf.register_new_resolver("algorithm_head_policy", algorithm_policy, replace=True)


@dataclass
class HeadConfig:
    """Head policy (docs/theory.md §4), one of :data:`bilevel.app.head_policy.HEAD_POLICIES` (what
    each does: :mod:`bilevel.app.head_policy`); ``scale`` multiplies the initial head of ``scaled``;
    ``init`` draws a random head: ``default`` (``nn.Linear``'s) or ``paper`` (the authors' Kaiming
    normal, zero bias). Unset, ``policy`` is the algorithm's own
    (:func:`~bilevel.app.head_policy.algorithm_policy`; :func:`validate` records the value)."""

    checks: ClassVar[dict[str, Check]] = {"policy": OneOf(HEAD_POLICIES), "scale": NON_NEGATIVE,
                                          "init": OneOf(HEAD_INITS)}

    policy: str = "${algorithm_head_policy:${algorithm.name}}"
    scale: float = 1.0
    init: str = "default"


@dataclass
class StudyConfig:
    """A study's declared comparisons (``configs/experiment/*.yaml``; read by ``bilevel-report``,
    :mod:`bilevel.report.study_claims`): ``name`` and ``comparisons``, a list of mappings. Not part of
    a run's trajectory: the report groups runs without it."""

    name: str = ""
    comparisons: list[Any] = field(default_factory=list)


@dataclass
class AblationConfig:
    """Which decomposition terms form the encoder's meta-gradient (docs/theory.md §3).

    ``keep`` (a list) keeps only those terms; ``drop`` removes terms. ``none`` with both
    empty is the plain algorithm's update path, unchanged. The head always receives its
    exact meta-gradient.
    """

    name: str = "none"
    keep: Optional[list[str]] = None
    drop: list[str] = field(default_factory=list)


@dataclass
class TrainLoopConfig:
    """Outer loop: ``steps`` outer updates on meta-batches of ``meta_batch`` tasks with the
    algorithm's outer optimiser (Adam by default) at ``lr``; training scalars every ``log_every``
    steps and evaluation before the first step, every ``eval_every`` steps and after the last. The
    decomposition, with its identity and reconstruction checks, is computed at step 0 (from 0;
    logged at 1, like that step's loss) and every ``decompose_every`` steps (0: never), and at the
    last step of a run without an ablation (:func:`bilevel.app.train.decomposes_at`); the checks are logged
    (``decomp/check/identity`` → ``checks/log10_identity``), not enforced. Its images are drawn
    on those steps that are multiples of ``image_every`` (0: never) or the last. A checkpoint
    every ``checkpoint_every`` steps and after the last.
    ``resume``: ``auto`` continues the directory's checkpoint when its trajectory keys match
    (else starts a new run), ``true`` requires a checkpoint, ``force`` also lets
    ``steps`` and the logging cadence change, ``false`` refuses a directory that holds one
    (:mod:`bilevel.app.lifecycle.resume`). ``memory_gb``: the memory one meta-step may take (null: what the
    device has available less a margin); ``execution``/``memory`` set to ``auto`` pick the fastest
    combination that fits, and a configuration that fits none is refused (:mod:`bilevel.execution.memory`)."""

    checks: ClassVar[dict[str, Check]] = {
        "steps": AT_LEAST_1, "meta_batch": AT_LEAST_1, "lr": POSITIVE, "eval_every": AT_LEAST_1,
        "log_every": AT_LEAST_1, "decompose_every": NON_NEGATIVE, "image_every": NON_NEGATIVE,
        "checkpoint_every": AT_LEAST_1, "resume": OneOf(RESUME_MODES), "memory_gb": POSITIVE,
    }

    steps: int = 400
    meta_batch: int = 4
    lr: float = 1e-3
    eval_every: int = 100
    log_every: int = 10
    decompose_every: int = 25
    image_every: int = 200
    checkpoint_every: int = 100
    resume: str = "auto"
    memory_gb: Optional[float] = None


@dataclass
class EvalConfig:
    """Held-out evaluation (:mod:`bilevel.app.evaluation`): every ``train.eval_every`` steps on
    ``tasks`` tasks of ``split``, and once at the end on ``final_tasks`` tasks of ``final_split``,
    in batches of ``batch`` tasks drawn from a fixed sequence: the same tasks on any machine under
    any load. ``budget_s`` / ``final_budget_s`` (None or 0: none, the default) instead cap each
    evaluation's time by the measured time of a batch, a count that then depends on the machine
    and is logged as such. Accuracy after every test-time inner step, with and
    without test-time zeroing, with 95 % confidence intervals over the tasks; the headline is
    the accuracy after ``headline_step`` inner steps (None: the number training uses)."""

    checks: ClassVar[dict[str, Check]] = {
        "tasks": AT_LEAST_1, "final_tasks": AT_LEAST_1, "split": OneOf(SPLITS), "final_split": OneOf(SPLITS),
        "batch": AT_LEAST_1, "budget_s": NON_NEGATIVE, "final_budget_s": NON_NEGATIVE, "headline_step": NON_NEGATIVE,
    }

    tasks: int = 100
    split: str = "val"
    final_tasks: int = 400
    final_split: str = "test"
    batch: int = 20
    budget_s: Optional[float] = None
    final_budget_s: Optional[float] = None
    headline_step: Optional[int] = None


@dataclass
class DistConfig:
    """Runs over many processes (``torchrun``; ``docs/distributed.md``), ignored without a
    launcher: ``backend`` auto|gloo|nccl (auto: NCCL on CUDA, gloo on the CPU); ``timeout_s``, the
    longest a process waits for the others in a collective (a process that dies is noticed at
    once; this bounds a hung one, and must exceed the longest gap between two collectives:
    a training step, an evaluation, rank 0's checkpoint or ``execution=auto`` measurement);
    ``check_every``, the cadence of the check that every process holds the same state (0: never).
    None of them is part of the resume contract, nor is the number of processes."""

    checks: ClassVar[dict[str, Check]] = {
        "backend": OneOf(BACKENDS), "timeout_s": POSITIVE, "check_every": NON_NEGATIVE,
    }

    backend: str = "auto"
    timeout_s: float = 60.0
    check_every: int = 10


@dataclass
class TrainConfig:
    """A training run. ``device`` auto|cpu|cuda; ``execution`` auto|vmap|loop|shared; ``memory``
    store|recompute|recompute:K|auto (:mod:`bilevel.hypergrad.recompute`; checked by the algorithm);
    ``precision`` fp32|bf16|fp16: 16-bit derivative kernels in the encoder under float32 values and
    parameters (:mod:`bilevel.primitives.precision`; needs ``dtype=float32``; fp16 adds a dynamic
    loss scale, :mod:`bilevel.app.loss_scale`). ``cpu_conv`` onednn|native: the CPU convolution
    kernels (``torch.backends.mkldnn.enabled``; :data:`CPU_CONVS`). On a trained ResNet-12 at 84×84
    oneDNN's float32 weight gradients put the decomposition identity at 1.7e-5 and the native
    kernels at 2.1e-6; native kernels take 1.46× the time of a Conv-4 step and 1.81× that of a
    5-step ResNet-12 step (``benchmarks/cpu_conv.py``; docs/performance.md).
    The model's checks are declared here, as :class:`ModelConfig` lives with the models."""

    checks: ClassVar[dict[str, Check]] = {
        "seed": NON_NEGATIVE, "device": OneOf(DEVICES), "dtype": OneOf(DTYPES), "execution": OneOf(EXECUTIONS),
        "precision": OneOf(PRECISIONS), "cpu_conv": OneOf(CPU_CONVS), "model.name": OneOf(MODELS), "model.channels": AT_LEAST_1, "model.hidden": AT_LEAST_1,
        "model.layers": AT_LEAST_1, "model.pool": OneOf(POOLS),
        "model.dropblock_rate": Range(low=0, high=1, high_open=True), "model.dropblock_size": AT_LEAST_1,
    }

    algorithm: Any = field(default_factory=lambda: {"name": "maml"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    cosine: CosineConfig = field(default_factory=CosineConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    precision: str = "fp32"
    cpu_conv: str = "onednn"
    execution: str = "auto"
    memory: str = "store"


def typed_config(cfg: Any) -> DictConfig:
    """Merge ``cfg`` into the TrainConfig schema: a wrong type fails here."""
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)


def validate(cfg: DictConfig) -> None:
    """Reject keys the schema lacks and values its checks refuse (:class:`ConfigError`, naming
    the key and the valid values). ``train.resume`` is read case-insensitively (``true``
    on the command line arrives as a boolean); ``head.policy`` is settled (its default is the
    algorithm's)."""
    cfg.train.resume = str(cfg.train.resume).lower()
    cfg.head.policy = str(cfg.head.policy)  # the algorithm's default, resolved: config.yaml records the value
    reject_unknown_keys(cfg, OmegaConf.structured(TrainConfig))
    check_declared(cfg)


def register_configs() -> None:
    """Register the schema ``base_train`` and a preset for every plugin that has no preset file
    (:func:`bilevel.app.config.catalog.register_plugin_presets`; idempotent)."""
    ConfigStore.instance().store(name="base_train", node=TrainConfig)
    register_plugin_presets()
