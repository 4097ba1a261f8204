"""Seeded problems, an independent MAML reference and relative errors, shared by the tests and
``theory_checks`` (which ships in the package, so this module does too).

* :func:`seeded_problem`: a seeded model (``mlp`` or ``conv4``), its parameters (random head,
  or the zeroing trick ``W = b = 0``) and a Gaussian meta-batch (:func:`seeded_batch`), options
  as in :class:`ProblemSpec`. The random draws are fixed by the options: the global seed is set
  to ``seed`` before the model is built, and the batch is drawn from a generator of its own
  (``batch_seed``, default ``seed``) — label permutations first, then the support inputs, then
  the query inputs.
* :func:`reference_meta_grad` (with :func:`reference_adapt`, :func:`reference_meta_loss`): a
  plain-autograd unrolled MAML — ``F.cross_entropy`` of the whole model through
  ``functional_call``, inner gradients by ``torch.autograd.grad`` (``create_graph`` for second
  order). It shares nothing with the engine but the model definition.
* :func:`reference_chain_direction`: a plain-autograd SGD / Langevin chain over every parameter
  (Entropy-SGD's and Reptile's direction without noise; schedule :class:`NoiselessChain`),
  independent of ``bilevel.solvers.chain``.
* :func:`conv_decisions`: record the discrete decisions of conv4's blocks (each max-pool's argmax and
  each ReLU's sign) in one run and impose them on another, so that a float32 run can be compared
  with float64 on the same piece of a piecewise-smooth map (``docs/performance.md``).
* :func:`default_config` and :func:`float32_errors`: an algorithm's default configuration and, per
  execution path and task, its float32 meta-gradient's error against float64, raw and
  decision-matched (used by ``tests/test_precision.py`` and ``benchmarks/meta_step.py``).
* :func:`rel_err`: ``‖a − b‖ / ‖b‖`` over tensors or parameter dicts, as a float.

Nothing here is imported by the engine; it depends only on ``torch``, ``omegaconf`` (the presets
of ``configs/algorithm/``) and the engine's public builders.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor
from torch.func import functional_call

from bilevel.algorithm import BilevelAlgorithm, build_algorithm
from bilevel.data.batch import TaskBatch
from bilevel.primitives.models import BilevelModel, ConvBlock, Layout, ModelConfig, build_model
from bilevel.primitives.params import HEAD_BIAS, HEAD_WEIGHT, Params, is_head

INPUT_SHAPES = {"mlp": (4,), "conv4": (1, 16, 16)}
"""The default input shape of each tiny model."""
INNER_LR = 0.4
"""The inner step size of :meth:`Problem.algorithm`."""
HEADS = ("random", "zero")


def class_labels(ways: int, per_class: int, tasks: int) -> Tensor:
    """``[tasks, ways · per_class]`` int64 labels laid out class by class: ``0 0 1 1 2 2 …``."""
    return torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)


def labelled_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   ways: int) -> TaskBatch:
    """A whole meta-batch of the given tensors whose dataset classes are its labels
    (``classes[t, j] = j``)."""
    classes = torch.arange(ways, device=support_y.device).repeat(support_y.shape[0], 1)
    return TaskBatch(support_x, support_y, query_x, query_y, classes)


def seeded_batch(generator: torch.Generator, *, ways: int, shots: int, queries: int, tasks: int,
                 shape: Sequence[int], dtype: torch.dtype = torch.float64, permute: bool = False) -> TaskBatch:
    """Standard-normal inputs ``[tasks, ways · k, *shape]`` (``k`` = ``shots`` / ``queries``),
    labels class by class. ``permute``: each task relabels its classes by a random permutation
    ``π`` (class ``c`` carries label ``π(c)``; ``classes[t]`` is ``π⁻¹``), drawn before the inputs."""
    support_y, query_y = class_labels(ways, shots, tasks), class_labels(ways, queries, tasks)
    classes = torch.arange(ways).repeat(tasks, 1)
    if permute:
        perms = torch.stack([torch.randperm(ways, generator=generator) for _ in range(tasks)])
        support_y, query_y, classes = perms.gather(1, support_y), perms.gather(1, query_y), perms.argsort(1)
    return TaskBatch(
        support_x=torch.randn(tasks, ways * shots, *shape, generator=generator, dtype=dtype),
        support_y=support_y,
        query_x=torch.randn(tasks, ways * queries, *shape, generator=generator, dtype=dtype),
        query_y=query_y,
        classes=classes,
    )


@dataclass(frozen=True)
class Problem:
    """A model, its parameters and a meta-batch; ``inner_lr`` is what :meth:`algorithm` uses."""

    model: BilevelModel
    params: Params
    batch: TaskBatch
    inner_lr: float = INNER_LR

    @property
    def ways(self) -> int:
        """Number of classes per task."""
        return self.batch.ways

    def algorithm(self, **config: Any) -> BilevelAlgorithm:
        """The registered MAML plugin on this model, with this problem's ``inner_lr``."""
        return build_algorithm({"name": "maml", "inner_lr": self.inner_lr, **config}, self.model)


@dataclass(frozen=True)
class ProblemSpec:
    """The options of :func:`seeded_problem`: ``ways``-way tasks with ``shots`` support and
    ``queries`` query inputs per class, ``tasks`` per meta-batch, inputs of ``shape`` (None: the
    model's :data:`INPUT_SHAPES`); the model's width (``hidden``/``layers`` for the MLP,
    ``channels`` for conv4, None: the model's default); ``head`` (``random``, or ``zero``:
    ``W = b = 0``); ``permute`` (random class labels per task, :func:`seeded_batch`); the seeds
    (``batch_seed`` None: ``seed``); ``dtype`` and ``device`` of the model, parameters and batch."""

    dtype: torch.dtype = torch.float64
    ways: int = 3
    shots: int = 1
    queries: int = 2
    tasks: int = 2
    shape: Optional[Sequence[int]] = None
    hidden: int = 8
    layers: int = 2
    channels: Optional[int] = 4
    head: str = "random"
    permute: bool = False
    seed: int = 0
    batch_seed: Optional[int] = None
    device: Union[str, torch.device] = "cpu"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")


def seeded_problem(name: str = "mlp", **options: Any) -> Problem:
    """A seeded problem (module docstring): model ``name`` with the ``options`` of
    :class:`ProblemSpec` (keywords, each defaulting as there). The batch is drawn on the CPU and
    moved to ``device``. An option that is not a field of :class:`ProblemSpec` raises ``TypeError``."""
    valid = [f.name for f in fields(ProblemSpec)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"seeded_problem: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    spec = ProblemSpec(**options)
    shape = tuple(INPUT_SHAPES[name] if spec.shape is None else spec.shape)
    generator = torch.Generator().manual_seed(spec.seed if spec.batch_seed is None else spec.batch_seed)
    torch.manual_seed(spec.seed)
    config = ModelConfig(name=name, hidden=spec.hidden, layers=spec.layers, channels=spec.channels)
    model = build_model(config, shape, spec.ways).to(device=spec.device, dtype=spec.dtype)
    params = model.init_params()
    if spec.head == "zero":
        params[HEAD_WEIGHT] = torch.zeros_like(params[HEAD_WEIGHT])
        params[HEAD_BIAS] = torch.zeros_like(params[HEAD_BIAS])
    batch = seeded_batch(generator, ways=spec.ways, shots=spec.shots, queries=spec.queries, tasks=spec.tasks,
                         shape=shape, dtype=spec.dtype, permute=spec.permute)
    return Problem(model, params, batch.to(spec.device))


def reference_adapt(model: BilevelModel, params: Params, x: Tensor, y: Tensor, *, steps: int, lr: float,
                    adapt: str, first_order: bool) -> Params:
    """One task's ``θ_{t+1} = θ_t − α ∇ L_S(θ_t)`` over the adapted keys (``head``: W, b; ``all``:
    every parameter), by ``torch.autograd.grad``; first order takes the inner gradients without a
    graph (constants). ``params`` must require grad for a meta-gradient to flow."""
    keys = [k for k in params if adapt == "all" or is_head(k)]
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=not first_order)
        fast.update({k: fast[k] - lr * g for k, g in zip(keys, grads)})
    return fast


def reference_meta_loss(model: BilevelModel, params: Params, batch: TaskBatch, *, steps: int, lr: float,
                        adapt: str, first_order: bool = False) -> Tensor:
    """Mean over tasks of the query cross-entropy after :func:`reference_adapt`."""
    losses = []
    for i in range(batch.support_y.shape[0]):
        fast = reference_adapt(model, params, batch.support_x[i], batch.support_y[i],
                               steps=steps, lr=lr, adapt=adapt, first_order=first_order)
        losses.append(F.cross_entropy(functional_call(model, fast, (batch.query_x[i],)), batch.query_y[i]))
    return torch.stack(losses).mean()


def reference_meta_grad(model: BilevelModel, params: Params, batch: TaskBatch, *, steps: int, lr: float,
                        adapt: str, first_order: bool = False) -> Params:
    """The MAML meta-gradient (all parameters) by backprop through :func:`reference_meta_loss`."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = reference_meta_loss(model, leaves, batch, steps=steps, lr=lr, adapt=adapt, first_order=first_order)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@dataclass(frozen=True)
class NoiselessChain:
    """The schedule of :func:`reference_chain_direction`: ``steps`` L ≥ 1, step size ``lr`` η',
    coupling ``gamma`` γ, EMA weight ``ema`` a ∈ (0, 1] and direction ``scale`` s."""

    steps: int
    lr: float
    gamma: float
    ema: float
    scale: float

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"NoiselessChain: steps must be >= 1, got {self.steps}")
        if not 0.0 < self.ema <= 1.0:
            raise ValueError(f"NoiselessChain: ema must be in (0, 1], got {self.ema}")


def reference_chain_direction(model: BilevelModel, params: Params, x: Tensor, y: Tensor,
                              chain: NoiselessChain) -> Params:
    """``d = s (x − μ_L)`` of a noiseless chain over every parameter on the batch ``(x, y)``:
    ``x'_ℓ = x'_{ℓ−1} − η' (∇f(x'_{ℓ−1}) + γ (x'_{ℓ−1} − x))``, ``μ_ℓ = (1 − a) μ_{ℓ−1} + a x'_ℓ``,
    ``x'_0 = μ_0 = x``, ``f`` the ``F.cross_entropy`` of the whole model, gradients by
    ``torch.autograd.grad``, the schedule ``chain``. Both are carried as displacements from ``x``
    (same values, no float32 cancellation in ``x − μ``)."""
    start = {k: v.detach() for k, v in params.items()}
    moved = {k: torch.zeros_like(v) for k, v in start.items()}
    mean = {k: torch.zeros_like(v) for k, v in start.items()}
    for _ in range(chain.steps):
        leaves = {k: (start[k] + moved[k]).requires_grad_() for k in start}
        loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        moved = {k: moved[k] - chain.lr * (grads[k] + chain.gamma * moved[k]) for k in start}
        mean = {k: (1 - chain.ema) * mean[k] + chain.ema * moved[k] for k in start}
    return {k: -chain.scale * m for k, m in mean.items()}


@contextmanager
def conv_decisions(decisions: list[tuple[Tensor, Tensor]], replay: bool,
                   blocks: Optional[Sequence[ConvBlock]] = None) -> Iterator[None]:
    """Inside the block, every conv4 block (:class:`~bilevel.primitives.models.ConvBlock`) appends its
    discrete decisions ``(argmax of each 2×2 window, pooled value > 0)`` to ``decisions``
    (``replay=False``), or takes them from ``decisions`` in call order (``replay=True``): the pool
    picks the recorded position and the ReLU keeps the recorded signs, so values and gradients are
    those of the model on the recorded piece. A replay must make the same calls as the recording:
    a call of another shape, or decisions left over, raise ``ValueError``. ``blocks`` (replay only):
    impose the recorded decisions on these modules alone; every other block's call takes its entry
    and decides for itself (None: every block). Record outside ``vmap`` (the decisions are plain
    tensors); a replay may run under ``vmap`` of one task."""
    forward, pending = ConvBlock.forward, iter(decisions)
    imposed = None if blocks is None else {id(block) for block in blocks}

    def recording(block: ConvBlock, x: Tensor, layout: Layout = None) -> Tensor:
        pooled, index = F.max_pool2d(block.norm(block._convolve(x), layout), 2, return_indices=True)
        decisions.append((index, pooled > 0))
        return F.relu(pooled)

    def replaying(block: ConvBlock, x: Tensor, layout: Layout = None) -> Tensor:
        index, positive = next(pending, (None, None))
        if imposed is not None and id(block) not in imposed:
            out = forward(block, x, layout)
            if index is None or index.shape != out.shape:
                raise ValueError("conv_decisions: the replay calls a conv block the recording did not call")
            return out
        normed = block.norm(block._convolve(x), layout)
        if index is None or tuple(index.shape) != (*normed.shape[:-2], normed.shape[-2] // 2, normed.shape[-1] // 2):
            raise ValueError("conv_decisions: the replay calls a conv block the recording did not call")
        pooled = normed.flatten(-2).gather(-1, index.flatten(-2)).view(index.shape)
        return pooled * positive.to(pooled.dtype)

    ConvBlock.forward = replaying if replay else recording
    try:
        yield
    finally:
        ConvBlock.forward = forward
    if replay and next(pending, None) is not None:
        raise ValueError("conv_decisions: the replay made fewer conv block calls than the recording")


def default_config(name: str) -> dict[str, Any]:
    """The ``algorithm`` node of the preset ``configs/algorithm/<name>.yaml``, else ``{"name": name}``
    (a plugin without a preset runs at its Config's defaults)."""
    preset = files("configs") / "algorithm" / f"{name}.yaml"
    if preset.is_file():
        return OmegaConf.to_container(OmegaConf.load(str(preset)).algorithm)
    return {"name": name}


def float32_errors(
    algo: BilevelAlgorithm, params: Params, tasks: Sequence[TaskBatch], replay_above: float = 0.0,
) -> tuple[dict[str, tuple[list[float], list[float]]], list[Params]]:
    """Per execution path of ``algo`` (float32), per task: the relative error of its meta-gradient
    against the same algorithm in float64 (model, parameters and images cast up), *raw* and
    *decision-matched* (the float64 run's conv decisions imposed by :func:`conv_decisions`, so
    the error is round-off alone; a task whose raw error is at most ``replay_above`` keeps it, to
    save the replay); and the float64 meta-gradients of the first path's runs. The float64 runs
    take ``loop`` (a ``vmap`` path replays them) or the path itself; ``params`` are
    ``algo.meta_parameters`` of the network's."""
    algo64 = type(algo)(copy.deepcopy(algo.model).to(torch.float64), algo.config)
    params64 = {k: v.to(torch.float64) for k, v in params.items()}
    runs: dict[str, list[tuple[Params, list]]] = {}

    def float64_on(path: str) -> list[tuple[Params, list]]:
        path = "loop" if path == "vmap" else path
        if path not in runs:
            runs[path] = []
            for task in tasks:
                decisions: list[tuple[Tensor, Tensor]] = []
                with conv_decisions(decisions, replay=False):
                    exact = algo64.with_execution(path).meta_grad(params64, task.to(dtype=torch.float64)).grad
                runs[path].append((exact, decisions))
        return runs[path]

    out = {}
    for path in algo.executions:
        on_path, raw, matched = algo.with_execution(path), [], []
        for task, (exact, decisions) in zip(tasks, float64_on(path)):
            raw.append(rel_err({k: v.double() for k, v in on_path.meta_grad(params, task).grad.items()}, exact))
            if raw[-1] <= replay_above:
                matched.append(raw[-1])
                continue
            with conv_decisions(decisions, replay=True):
                grad = on_path.meta_grad(params, task).grad
            matched.append(rel_err({k: v.double() for k, v in grad.items()}, exact))
        out[path] = (raw, matched)
    return out, [exact for exact, _ in next(iter(runs.values()))]


def rel_err(a: Union[Tensor, Mapping[str, Tensor]], b: Union[Tensor, Mapping[str, Tensor]],
            keys: Optional[Sequence[str]] = None) -> float:
    """``‖a − b‖ / ‖b‖`` (Euclidean, over every entry of every leaf), as a float.

    ``a`` and ``b`` are tensors or parameter dicts; dicts are compared over ``keys``, by
    default ``b``'s, which must then be ``a``'s too. When ``b`` is exactly zero the result is the
    absolute error ``‖a‖`` (0 when both are zero), so that exact zeros compare without a
    division by zero."""
    if isinstance(b, Tensor):
        a, b = {"": a}, {"": b}
    if keys is None:
        if a.keys() != b.keys():
            raise ValueError(f"rel_err: the dicts have different keys: {sorted(a)} vs {sorted(b)}")
        keys = list(b)
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in keys) ** 0.5
    return num / den if den else num
