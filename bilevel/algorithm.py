"""The abstract bi-level algorithm, its typed configuration and the plugin registry.

An algorithm maps ``(params, TaskBatch)`` to a meta-gradient (what the outer optimiser
follows) and, on request, to its :class:`~bilevel.decomposition.record.Decomposition`. Plugins
subclass :class:`BilevelAlgorithm`, declare a config dataclass, and register by name with
:func:`register` or through the ``bilevel.algorithms`` entry-point group, so an external
package adds an algorithm without touching the engine.
"""
from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from bilevel.data.batch import TaskBatch
from bilevel.decomposition.step import MetaStep, Want
from bilevel.errors import ConfigError, UnknownAlgorithm
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params
from bilevel.solvers.support import InnerConfig
from bilevel.validate import AT_LEAST_1, Check, check_declared, closest, parse_memory

ENTRY_POINT_GROUP = "bilevel.algorithms"
HEAD_ENTRY_TERMS = ("contrastive", "contrastive_query", "contrastive_support", "coefficient")
"""The terms whose node cotangents live on the trace's entries ``(Φ_τ, A_τ)``: all exactly 0
without entries."""


@dataclass
class AlgorithmConfig:
    """Fields every algorithm has. ``name`` selects the plugin; ``test_steps`` is the number
    of inner steps at evaluation (None: the training number; at least 1, as the headline is
    the accuracy after adaptation). ``checks`` declares the valid
    values of fields (:mod:`bilevel.validate`); a plugin's Config adds its own."""

    checks: ClassVar[dict[str, Check]] = {"test_steps": AT_LEAST_1}

    name: str = "maml"
    test_steps: Optional[int] = None

    @property
    def inner(self) -> InnerConfig:
        """The inner loop as the engine reads it (steps, step size, momentum, adapted set, order):
        a Config with an inner loop builds it from its own fields. Default: one step over the
        whole network, nothing differentiated through it."""
        return InnerConfig(order="first_order")


class BilevelAlgorithm(ABC):
    """A min-min bi-level algorithm over a :class:`BilevelModel`.

    Subclasses set ``Config`` (a dataclass extending :class:`AlgorithmConfig`) and
    implement :meth:`meta_step` and :meth:`evaluate` (the engine's bases do both). ``terms``
    names the decomposition terms the algorithm produces; ``executions`` the per-task paths it
    supports (the trainer's ``execution=auto`` times them). ``execution`` is fixed at
    construction (:meth:`with_execution` gives a twin on another path). ``outer_step_done`` is
    called after every outer update (for schedules); ``state_dict`` holds all the state there is.
    """

    Config: ClassVar[type] = AlgorithmConfig
    terms: tuple[str, ...] = ()
    splits_contrastive: ClassVar[bool] = False
    executions: tuple[str, ...] = ("loop",)
    head_policy: ClassVar[str] = "zeroing"
    """The ``head.policy`` a run uses when the user sets none (``docs/theory.md`` §4). An algorithm
    whose inner loop cannot learn from a zero head (BOIL: the head is frozen in the inner loop, so
    from ``W_0 = 0`` the encoder never moves) declares ``"random"``."""
    head_frozen: ClassVar[bool] = False
    """True when the inner loop never writes the head (BOIL: it adapts the encoder only). The trace
    then has no entries: every term but ``init`` (and noise) is exactly 0 (:meth:`structural_zeros`)
    and the decomposition has no pair weights (``Decomposition.absent``)."""

    def __init__(self, model: BilevelModel, config: Any, execution: Optional[str] = None) -> None:
        self.model = model
        self.config = config
        self._execution = self._checked_execution(execution or self.default_execution)

    @property
    def default_execution(self) -> str:
        """The path used when none is chosen (the first of :attr:`executions`)."""
        return self.executions[0]

    @property
    def execution(self) -> str:
        """How the tasks of a meta-batch run: ``vmap``, ``loop`` or ``shared``."""
        return self._execution

    def _checked_execution(self, execution: str) -> str:
        if execution not in self.executions:
            raise ConfigError(
                f"execution={execution} is not available for algorithm {getattr(self, 'name', type(self).__name__)!r} "
                f"with this configuration; available: {', '.join(self.executions)}"
            )
        return execution

    def with_execution(self, execution: str) -> "BilevelAlgorithm":
        """The same algorithm (same config, same state objects) running on ``execution``."""
        twin = copy.copy(self)
        twin._execution = self._checked_execution(execution)
        return twin

    memories: tuple[str, ...] = ("store",)
    """The memory strategies the algorithm offers (``store``; ``recompute`` takes ``recompute:K``
    too: :mod:`bilevel.hypergrad.recompute`)."""
    memory: str = "store"
    """How the meta-step holds what its backward needs: ``store`` or ``recompute[:K]``."""

    def memory_note(self) -> str:
        """Why a strategy is missing from :attr:`memories`, for the refusal (default: nothing)."""
        return ""

    def with_memory(self, memory: str) -> "BilevelAlgorithm":
        """The same algorithm holding its backward by ``memory`` (a :class:`ConfigError` naming
        what is available when it does not offer that strategy)."""
        try:
            parse_memory(memory)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if str(memory).partition(":")[0] not in self.memories:
            note = self.memory_note()
            raise ConfigError(
                f"memory={memory} is not available for algorithm {getattr(self, 'name', type(self).__name__)!r} "
                f"with this configuration; available: {', '.join(self.memories)}" + (f" ({note})" if note else "")
            )
        twin = copy.copy(self)
        twin.memory = str(memory)
        return twin

    @property
    def segment(self) -> Optional[int]:
        """Steps per recomputed segment (None: ``memory=store``)."""
        return parse_memory(self.memory)

    @property
    def eval_steps(self) -> int:
        """Inner steps at evaluation time."""
        steps = self.config.test_steps
        return self.train_steps if steps is None else steps

    @property
    def train_steps(self) -> int:
        """Inner steps during meta-training (``config.inner.steps``; plugins with another notion override this)."""
        return self.config.inner.steps

    @abstractmethod
    def meta_step(self, params: Params, batch: TaskBatch, want: Want = Want()) -> MetaStep:
        """The meta-step of the mean query loss over ``batch``: the plain, ablated or decomposed
        meta-gradient as ``want`` says (:mod:`bilevel.hypergrad.rows`)."""

    def meta_grad(self, params: Params, batch: TaskBatch, decompose: bool = False) -> MetaStep:
        """The plain meta-gradient, with the decomposition into :attr:`terms` when ``decompose``."""
        return self.meta_step(params, batch, Want(terms=self.terms if decompose else ()))

    def ablated_meta_grad(self, params: Params, batch: TaskBatch, keep: tuple[str, ...]) -> MetaStep:
        """The meta-step whose ``grad`` has the sum of the ``keep`` terms on everything but the
        head, and the exact meta-gradient on the head."""
        return self.meta_step(params, batch, Want(keep=tuple(keep)))

    @abstractmethod
    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> Tensor:
        """Query accuracy of every task after ``0 … steps`` inner steps: ``[tasks, steps + 1]``
        (the trainer averages over tasks and reports confidence intervals from the spread)."""

    def structural_zeros(self, head_policy: str) -> dict[str, str]:
        """Terms exactly 0 on the encoder by construction under ``head_policy``, each with the
        reason (logged once; an ablation that removes only these is warned about). Default: ``init``
        (``Σ_q g_qᵀ W_0 dφ_q``) when every inner loop starts from ``W_0 = 0`` (an algorithm whose
        ``W_0`` is not the meta head overrides this), and every term that reads the trace's entries
        when :attr:`head_frozen`."""
        zeros = {}
        if self.head_frozen:
            zeros = dict.fromkeys(HEAD_ENTRY_TERMS, "the inner loop never writes the head (head_frozen): the trace "
                                                    "has no entries")
        if head_policy == "zeroing":
            zeros["init"] = "head.policy=zeroing starts every inner loop from W_0 = 0"
        return zeros

    def meta_parameters(self, params: Params) -> Params:
        """The outer problem's variables: the network's ``params`` plus whatever the algorithm
        learns itself (Meta-SGD's inner learning rates, ...), as one dict. The trainer optimises,
        checkpoints and shares out exactly this dict. Default: the network's parameters alone."""
        return params

    def make_outer_optimizer(self, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
        """The outer optimiser (Adam by default; a plugin whose outer step is defined by the
        algorithm, e.g. Entropy-SGD's ``x ← x − η d``, returns SGD with its own step)."""
        return torch.optim.Adam(params, lr=lr)

    def outer_step_done(self) -> None:
        """Hook called once after every outer update."""

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state to checkpoint (counters, schedules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


_REGISTRY: dict[str, type[BilevelAlgorithm]] = {}


def register(name: str):
    """Class decorator: register a :class:`BilevelAlgorithm` under ``name``."""

    def wrap(cls: type[BilevelAlgorithm]) -> type[BilevelAlgorithm]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice ({existing} and {cls})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_plugins() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            register(ep.name)(ep.load())


def available_algorithms() -> list[str]:
    """Names of every registered algorithm (built-in and entry points)."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[BilevelAlgorithm]:
    """The algorithm class registered under ``name``; a clear error when there is none."""
    _load_plugins()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        raise UnknownAlgorithm(f"unknown algorithm {name!r} (algorithm.name={name});{closest(name, known)} "
                               f"registered plugins: {', '.join(known)}", name, "algorithm.name")
    return _REGISTRY[name]


def algorithm_config(config: Any) -> Any:
    """Validate a mapping (dict or DictConfig with ``name``) against its plugin's Config.

    Unknown keys, wrong types and values the Config's declared checks refuse fail here with
    :class:`~bilevel.errors.ConfigError`, naming the key and the valid fields or values.
    """
    raw = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    cls = get_algorithm(str(raw.get("name", AlgorithmConfig.name)))
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for algorithm {cls.name!r}; valid keys: {', '.join(valid)}"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), raw)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad value in algorithm config: {err}") from err
    config = OmegaConf.to_object(merged)
    check_declared(config, "algorithm.")
    return config


def build_algorithm(config: Any, model: BilevelModel, execution: Optional[str] = None) -> BilevelAlgorithm:
    """Instantiate the plugin named by ``config.name`` with its validated config (on
    ``execution``, or the plugin's default path)."""
    cfg = algorithm_config(config)
    return get_algorithm(cfg.name)(model, cfg, execution)
