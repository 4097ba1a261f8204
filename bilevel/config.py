"""Typed configuration of a training run (Hydra structured configs).

The schema ``base_train`` is registered in Hydra's ConfigStore; ``configs/train.yaml``
extends it, so an unknown key or a wrong type fails at start-up naming the key. The
``algorithm`` node is validated against the selected plugin's own Config dataclass
(:func:`bilevel.algorithm.algorithm_config`), so a plugin's keys are typed too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from .data import DataConfig
from .models import ModelConfig

HEAD_POLICIES = ("random", "scaled", "zero_init", "zeroing")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


@dataclass
class HeadConfig:
    """Head policy (THEORY §4): ``random`` (Kaiming init), ``scaled`` (init × ``scale``),
    ``zero_init`` (zero once), ``zeroing`` (W = b = 0 before every outer step)."""

    policy: str = "zeroing"
    scale: float = 1.0


@dataclass
class AblationConfig:
    """Which decomposition terms form the encoder's meta-gradient (THEORY §3).

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
    algorithm's outer optimiser (Adam by default) at ``lr``; evaluation every ``eval_every``
    steps; decomposition logged every ``decompose_every`` steps (0: never) and its images
    every ``image_every`` steps (0: never); ``identity_check`` compares the terms with the
    plain hypergradient on decomposition steps."""

    steps: int = 400
    meta_batch: int = 4
    lr: float = 1e-3
    eval_every: int = 100
    log_every: int = 10
    decompose_every: int = 25
    image_every: int = 200
    checkpoint_every: int = 100
    resume: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation: ``tasks`` tasks (a fixed set, same every time) of the ``split``;
    accuracy after every test-time inner step, with and without test-time zeroing."""

    tasks: int = 100
    split: str = "val"
    final_split: str = "test"
    final_tasks: int = 200


@dataclass
class TrainConfig:
    """A training run. ``device`` auto|cpu|cuda; ``execution`` auto|vmap|loop|shared."""

    algorithm: Any = field(default_factory=lambda: {"name": "maml"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    execution: str = "auto"


def register_configs() -> None:
    """Register the schema ``base_train`` (idempotent)."""
    ConfigStore.instance().store(name="base_train", node=TrainConfig)
