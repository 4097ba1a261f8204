"""The chain hypergradient (the ``prox_mean`` direction of a chain, run by :mod:`bilevel.solvers.chain`) and its first-order decomposition (docs/theory.md §2, §6).

**The chain.** On the parameters ``x = (θ, W, b)`` restricted to the adapted set
(``"all"``, or ``"head"``: the encoder stays at ``θ``), for ``ℓ = 1 … L`` on the task's
batch ``B`` (the same samples at every step; ``batches`` picks support, query or both pooled):

    dx'_ℓ = ∇f_B(x'_{ℓ−1}) − γ (x − x'_{ℓ−1})
    x'_ℓ  = x'_{ℓ−1} − η' dx'_ℓ + sqrt(η') ε n_ℓ,        x'_0 = x
    μ_ℓ   = (1 − a) μ_{ℓ−1} + a x'_ℓ,                    μ_0 = x

*Noise convention*: ``n_ℓ ~ N(0, I)``, independent per coordinate, step and task, so one step
of a chain whose gradient vanishes moves every coordinate by a centred Gaussian of variance
``η' ε²``. The noise is an *input* (drawn by the algorithm, outside the per-task function),
so ``vmap`` and the loop see the same draws. *EMA convention*: weight ``a`` on the newest
iterate, ``μ_0 = x``, hence ``μ_L = (1 − a)^L x + Σ_ℓ a (1 − a)^{L−ℓ} x'_ℓ``; ``a = 1`` makes
``μ`` the last iterate. The head runs through the head primitives (``head_shrink`` for the
coupling, ``head_write`` for the gradient, ``head_add_noise`` for the noise), so its trace
explains every step's logits by eq. (1). The chain is carried as displacements from ``x``
(algebraically the same, without the float32 cancellation in ``x − μ``): the encoder as
``u = θ' − θ``, the head's EMA from its trace (:func:`~bilevel.primitives.head.head_displacement`).

**The direction** (the ``prox_mean`` hypergradient) is ``d = s (x − μ_L)`` on the adapted set,
``s`` the algorithm's scale (``γ`` for Entropy-SGD). Non-adapted parameters (the encoder when
``adapt = "head"``) get the chain-average of their own gradient, the local-entropy gradient
of parameters outside the Gibbs measure, estimated with the same EMA started at the first
gradient: ``ν = Σ_ℓ v_ℓ ∇f_B(x'_{ℓ−1})``, ``v_1 = (1 − a)^{L−1}``, ``v_ℓ = a (1 − a)^{L−ℓ}``.
Unrolling the recursion with ``ρ = 1 − η'γ``:

    d = s Σ_ℓ w_ℓ (η' ∇f_B(x'_{ℓ−1}) − sqrt(η') ε n_ℓ),    w_ℓ = Σ_{k=ℓ}^{L} a (1 − a)^{L−k} ρ^{k−ℓ}

a fixed linear combination of the per-step gradients and noises (the proximal pulls are
folded into ``w``); the gradients are values, never differentiated: no second-order terms.

**The decomposition.** Step ℓ's encoder gradient is the VJP of ``φ(θ'_{ℓ−1}, X)`` with
cotangent ``G_ℓ W_{ℓ−1}`` and ``W_{ℓ−1} = W_0 + Σ_{τ<ℓ} A_τᵀ Φ_τ + ξ_{ℓ−1}`` (the trace), so

    G_ℓ W_{ℓ−1} = G_ℓ W_0  +  Σ_{τ<ℓ} C_τᵀ Φ_τ  +  G_ℓ ξ_{ℓ−1},     C_τ = A_τ G_ℓᵀ

``init`` + ``contrastive`` (one-sided: earlier steps' features act as supports and are
constants, batch ℓ acts as queries and alone receives gradient) + ``noise``. Weighting every
step by its coefficient in ``d`` and adding ``encoder_noise`` (``−s sqrt(η') ε Σ w_ℓ n^θ_ℓ``)
gives terms that sum to ``d``. Head part: the direct gradients ``s η' Σ_ℓ w_ℓ (G_ℓᵀ Φ_ℓ,
G_ℓᵀ 1)`` go to ``init`` (as the engine does for the MAML readout gradient) and the head's own
Langevin noise ``−s sqrt(η') ε Σ_ℓ w_ℓ n^{W,b}_ℓ`` to ``noise`` (everything the head noise
causes); ``contrastive`` and ``encoder_noise`` are zero on the head. So the identity holds
over all parameters.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor
from torch.func import vmap

from bilevel.algorithm import AlgorithmConfig, BilevelAlgorithm
from bilevel.data.batch import TaskBatch, task_position
from bilevel.decomposition.cotangents import (
    cosine_matrix,
    pair_weights,
    readout_head_gradient,
    term_cotangents,
)
from bilevel.decomposition.checks import reconstruction_error
from bilevel.execution.mapping import map_meta_steps, map_tasks
from bilevel.decomposition.assembly import assemble, mean_over_tasks
from bilevel.decomposition.step import MetaStep, TaskResult, Want
from bilevel.solvers.chain import BATCHES, ChainResult, ChainSpec, chain_batch, run_chain
from bilevel.primitives.head import readout
from bilevel.solvers.sgd import sgd_steps
from bilevel.solvers.support import InnerConfig, Support
from bilevel.primitives.losses import accuracy
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import (
    ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, is_head, tree_detach, with_encoder,
)

FEATURE_TERMS = {"init": "init", "contrastive": "contrastive_query", "noise": "noise"}
"""The chain's feature terms and the engine cotangent (``term_cotangents``) each one reads."""


def decompose_chain(
    result: ChainResult, params: Params, spec: ChainSpec, noise: Optional[Params], terms: tuple[str, ...]
) -> tuple[Params, Tensor]:
    """The terms of ``result.direction``, stacked ``{key: [len(terms), *shape]}`` in ``terms``
    order, and the largest eq. (1) reconstruction error over the steps (module docstring).

    Per step, the feature-term cotangents come from ``term_cotangents`` and are pulled back by
    one ``vmap`` of the step's VJP; with a frozen encoder the weighted cotangents of all steps
    share the one VJP at ``θ``.
    """
    feature_terms = [t for t in terms if t in FEATURE_TERMS]
    adapted_w, frozen_w = spec.step_weights()
    enc_weights = adapted_w if spec.adapt == "all" else frozen_w
    enc_terms: Optional[Params] = None
    pending = None
    head_w, head_b, errors = 0.0, 0.0, []
    for l, step in enumerate(result.steps):
        cots = term_cotangents(
            step.head.trace, step.features, step.logits_grad, tuple(FEATURE_TERMS[t] for t in feature_terms)
        )
        stacked = enc_weights[l] * torch.stack([cots[FEATURE_TERMS[t]].query_features for t in feature_terms])
        if spec.adapt == "all":
            (pulled,) = vmap(step.pull_back)(stacked)
            enc_terms = pulled if enc_terms is None else {k: enc_terms[k] + v for k, v in pulled.items()}
        else:
            pending = stacked if pending is None else pending + stacked
        gw, gb = readout_head_gradient(step.features, step.logits_grad)
        head_w, head_b = head_w + adapted_w[l] * gw, head_b + adapted_w[l] * gb
        errors.append(reconstruction_error(step.head.trace, step.features, step.logits))
    if pending is not None:
        (enc_terms,) = vmap(result.steps[0].pull_back)(pending)
    noise_dir = _noise_direction(params, spec, noise)
    out: dict[str, list[Tensor]] = {}
    for key, value in params.items():
        rows = []
        for term in terms:
            if term in FEATURE_TERMS and not is_head(key):
                row = enc_terms[key[len(ENCODER_PREFIX):]][feature_terms.index(term)]
            elif term == "init" and is_head(key):
                row = head_w if key == HEAD_WEIGHT else head_b
            elif (term == "noise" and is_head(key)) or (term == "encoder_noise" and not is_head(key)):
                row = noise_dir[key]
            else:
                row = torch.zeros_like(value)
            rows.append(row)
        out[key] = torch.stack(rows)
    return out, torch.stack(errors).amax()


def _noise_direction(params: Params, spec: ChainSpec, noise: Optional[Params]) -> Params:
    """``−s sqrt(η') ε Σ_ℓ w_ℓ n_ℓ`` for every adapted parameter (the noise's part of ``d``)."""
    if not spec.noise:
        return {}
    w = torch.tensor(spec.iterate_weights(), dtype=params[HEAD_WEIGHT].dtype, device=params[HEAD_WEIGHT].device)
    c = -spec.scale * spec.noise_amplitude
    return {k: c * torch.tensordot(w, noise[k], dims=1) for k in params if spec.adapted(k)}


@dataclass
class ChainConfig(AlgorithmConfig):
    """``inner_steps`` L, ``inner_lr`` η' (also the fine-tuning step at evaluation), ``adapt``
    in {all, head}, ``batches`` in {pooled, support, query}."""

    inner_steps: int = 5
    inner_lr: float = 0.1
    adapt: str = "all"
    batches: str = "pooled"

    @property
    def inner(self) -> InnerConfig:
        """The chain's steps, step size and adapted set (also evaluation's SGD); its gradients are values."""
        return InnerConfig(self.inner_steps, self.inner_lr, adapt=self.adapt, order="first_order")


class ChainAlgorithm(BilevelAlgorithm):
    """Base for algorithms whose outer direction is a chain's ``prox_mean`` direction.

    Subclasses implement :meth:`spec` (the chain of the current outer step) and, for noisy
    chains, :meth:`noise` (draws from their own generator, for every task of the meta-batch even
    when ``batch`` is one process's share of it, so the generator's state and each task's draws
    do not depend on the sharing). The meta-gradient is the mean of
    ``d`` over the tasks; ``loss``/``accuracy`` are the mean chain-step loss and accuracy on
    ``B``. Evaluation: mean query accuracy after ``0 … steps`` plain SGD steps of size
    ``inner_lr`` on the support over the adapted set. Pair weights are those of the last step
    (``C_τ = A_τ G_Lᵀ``, ``τ < L``), restricted to support rows × query columns, so they exist
    only with ``batches = "pooled"`` (otherwise no entries); feature cosines compare the first
    step's support features with the last step's query features (pooled) or ``φ_θ`` of the two
    sets (otherwise).
    """

    Config = ChainConfig
    executions = ("vmap", "loop")
    memories = ("store", "recompute")

    def __init__(self, model: BilevelModel, config: Any, execution: Optional[str] = None) -> None:
        if config.batches not in BATCHES:
            raise ValueError(f"batches must be one of {BATCHES}, got {config.batches!r}")
        super().__init__(model, config, execution)

    @property
    def terms(self) -> tuple[str, ...]:
        """The chain's terms (:meth:`ChainSpec.terms`: noise terms only for a noisy chain)."""
        return self.spec().terms()

    @abstractmethod
    def spec(self) -> ChainSpec:
        """The chain of the current outer step."""

    def noise(self, params: Params, spec: ChainSpec, tasks: int) -> Optional[Params]:
        """Standard normal draws ``[tasks, L, *shape]`` per adapted parameter (None: no noise)."""
        if spec.noise:
            raise NotImplementedError(f"{type(self).__name__} has a noisy chain but does not draw noise")
        return None

    def extras(self, spec: ChainSpec) -> dict[str, Tensor]:
        """Algorithm-specific scalars for :attr:`MetaStep.extras`."""
        return {}

    def meta_step(self, params: Params, batch: TaskBatch, want: Want = Want()) -> MetaStep:
        """The mean of ``d`` over the tasks. An ablated step has no cheaper exact path than the
        decomposition, so it decomposes and follows the kept terms (without reporting the
        decomposition it was not asked for)."""
        spec = self.spec()
        params = tree_detach(params)
        first, total = task_position(batch)  # a share of a meta-batch: draw for all of it, keep the share's rows
        noise = self.noise(params, spec, total)
        keys = sorted(noise) if noise else []
        share = slice(first, first + batch.support_y.shape[0])
        asked = want if want.terms or want.keep is None else Want(terms=self.terms, keep=want.keep)

        def task(p, xs, ys, xq, yq, *draws, want: Want) -> TaskResult:
            n = dict(zip(keys, draws)) if keys else None
            x, y = chain_batch(xs, ys, xq, yq, self.config.batches)
            result = run_chain(self.model, p, x, y, spec, n, record=bool(want.terms), recompute=self.segment is not None)
            out = TaskResult(result.loss, result.accuracy, grad=result.direction)
            if not want.terms:
                return out
            terms, reconstruction = decompose_chain(result, p, spec, n, want.terms)
            pairs, cosines = self._diagnostics(result, p, xs, xq, ys.shape[-1], yq.shape[-1])
            return out._replace(terms=terms, reconstruction=reconstruction, pairs=pairs, cosines=cosines)

        per_task = map_meta_steps(
            lambda w: partial(task, want=w), self.execution, params, batch.support_x, batch.support_y,
            batch.query_x, batch.query_y, *(noise[k][share] for k in keys), want=asked,
        )
        step = assemble(mean_over_tasks(per_task), batch, asked, self.extras(spec))
        if asked is not want:
            step.decomposition = None
        return step

    def _diagnostics(self, result: ChainResult, params: Params, xs, xq, n_s: int, n_q: int):
        last, first = result.steps[-1], result.steps[0]
        if self.config.batches == "pooled":
            if len(last.head.trace.coeffs):
                pairs = pair_weights(last.head.trace, last.logits_grad)[..., :n_s, n_s:]
            else:
                pairs = last.features.new_zeros(0, n_s, n_q)
            return pairs, cosine_matrix(first.features[:n_s], last.features[n_s:])
        encoder = encoder_part(params)
        cosines = cosine_matrix(self.model.encode(encoder, xs), self.model.encode(encoder, xq))
        return last.features.new_zeros(0, n_s, n_q), cosines

    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> Tensor:
        return finetune_accuracies(self.model, params, batch, steps, self.config.inner, self.execution)


def finetune_accuracies(
    model: BilevelModel, params: Params, batch: TaskBatch, steps: int, inner: InnerConfig, execution: str
) -> Tensor:
    """Query accuracy of every task after ``0 … steps`` plain SGD steps of size ``inner.lr`` on the
    support cross-entropy over ``inner.adapt``: ``[tasks, steps + 1]``."""
    one = InnerConfig(1, inner.lr, adapt=inner.adapt, order="first_order")

    def task(p, xs, ys, xq, yq):
        accs = []
        for t in range(steps + 1):
            if t:
                found = sgd_steps(model, p, Support(ys, images=xs), one)
                p = tree_detach(with_encoder(
                    {**p, HEAD_WEIGHT: found.head.weight, HEAD_BIAS: found.head.bias}, found.encoder
                ))
            accs.append(accuracy(readout(model.encode(encoder_part(p), xq), p[HEAD_WEIGHT], p[HEAD_BIAS]), yq))
        return torch.stack(accs)

    return map_tasks(task, execution, tree_detach(params), batch.support_x, batch.support_y,
                     batch.query_x, batch.query_y)
