"""The MAML claims of docs/theory.md §7 (1–7), measured on small float64 problems.

Every reference below is computed *independently* of the engine's decomposition: plain
``torch.autograd`` through an unrolled MAML written with ``functional_call`` on the whole
model (``nn.Linear`` head, ``F.cross_entropy``; :func:`bilevel.testing.reference_meta_grad`),
closed forms of §3.1, or autograd of a surrogate. Problems: an MLP encoder (6 → 8 → 8, ReLU), N = 3 ways, 2 shots, 2 queries,
2 tasks (one task for the permutation claim), inner step α = 0.4.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel import InnerConfig, MetaStep, Support, build_algorithm, sgd_steps
from bilevel.data.batch import TaskBatch
from bilevel.primitives.head import readout, reconstruct_logits
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import ENCODER_PREFIX, HEAD_BIAS, HEAD_WEIGHT, Params, encoder_part, is_head
from bilevel.testing import labelled_batch, reference_adapt, reference_meta_grad, rel_err, seeded_problem

from .core import ClaimResult, check, max_abs

DTYPE = torch.float64
WAYS = 3
SHOTS = 2
QUERIES = 2
TASKS = 2
INPUT_SHAPE = (6,)
ALPHA = 0.4
ROUNDOFF = 1e-10
ORDERS = ("second_order", "first_order")
ADAPTS = ("head", "all")
STEPS = (1, 3)


# ------------------------------------------------------------------------------------ problems
def _problem(seed: int, tasks: int = TASKS) -> tuple[BilevelModel, Params, TaskBatch]:
    """A seeded MLP model, its (random, Kaiming) parameters and a Gaussian meta-batch whose
    tasks carry a random label permutation each."""
    p = seeded_problem("mlp", ways=WAYS, shots=SHOTS, queries=QUERIES, tasks=tasks, shape=INPUT_SHAPE,
                       permute=True, seed=seed)
    return p.model, p.params, p.batch


def _with_head(params: Params, weight: Tensor, bias: Tensor) -> Params:
    return {**params, HEAD_WEIGHT: weight, HEAD_BIAS: bias}


def _maml(model: BilevelModel, *, adapt: str, order: str, steps: int):
    return build_algorithm(
        {"name": "maml", "adapt": adapt, "order": order, "inner_steps": steps, "inner_lr": ALPHA}, model
    )


def _max_abs_over(tree: Params, keys: list[str]) -> float:
    return max(max_abs(tree[k]) for k in keys)


def _term_sum(step: MetaStep) -> Params:
    terms = list(step.decomposition.terms.values())
    return {k: sum(t[k] for t in terms) for k in terms[0]}


def _tag(adapt: str, order: str, steps: int) -> str:
    return f"{'SO' if order == 'second_order' else 'FO'} {adapt} T={steps}"


# ----------------------------------------------------------------------- independent references
def reference_hypergradient(
    model: BilevelModel, params: Params, batch: TaskBatch, *, adapt: str, order: str, steps: int
) -> Params:
    """Plain-autograd unrolled MAML (:func:`bilevel.testing.reference_meta_grad`): ``steps`` SGD
    steps of size α on ``F.cross_entropy`` of the whole model called with ``functional_call``;
    second order keeps the graph of the inner gradients, first order treats them as constants.
    Mean over tasks."""
    return reference_meta_grad(model, params, batch, steps=steps, lr=ALPHA, adapt=adapt,
                               first_order=order == "first_order")


def _features(model: BilevelModel, encoder: Params, x: Tensor) -> Tensor:
    return functional_call(model.encoder, encoder, (x,))


def _task_features(model: BilevelModel, encoder: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
    """Support and query features ``[tasks, n, d]`` (the MLP has no batch statistics)."""
    tasks = batch.support_x.shape[0]
    phi_s = _features(model, encoder, batch.support_x.flatten(0, 1)).unflatten(0, (tasks, -1))
    phi_q = _features(model, encoder, batch.query_x.flatten(0, 1)).unflatten(0, (tasks, -1))
    return phi_s, phi_q


def _encoder_leaves(params: Params) -> Params:
    """Detached copies of the encoder parameters (un-prefixed) that require grad."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in encoder_part(params).items()}


def _prefixed(names: Params, grads: tuple[Tensor, ...]) -> Params:
    return {ENCODER_PREFIX + k: g for k, g in zip(names, grads)}


def _zero_head_predictions(phi_s: Tensor, ys: Tensor, phi_q: Tensor) -> Tensor:
    """Post-adaptation query predictions of one head-only SGD step from ``W_0 = 0, b_0 = 0``
    (§3.1): ``A_s = (α/n_s)(e_{y_s} − 1/N)``, ``z_q = Σ_s A_s (⟨φ_s, φ_q⟩ + 1)``."""
    coeff = (ALPHA / ys.shape[-1]) * (F.one_hot(ys, WAYS).to(DTYPE) - 1.0 / WAYS)
    kern = phi_s @ phi_q.transpose(-1, -2) + 1.0
    return torch.softmax(kern.transpose(-1, -2) @ coeff, dim=-1)


def _closed_form_pair_weights(ys: Tensor, yq: Tensor, p_q: Tensor) -> Tensor:
    """``C[s,q] = −(α/(n_s n_q)) (1[y_s = y_q] − p_q[y_s])``: ``[..., n_s, n_q]``."""
    same = (ys.unsqueeze(-1) == yq.unsqueeze(-2)).to(DTYPE)
    p_at_ys = p_q.gather(-1, ys.unsqueeze(-2).expand(*p_q.shape[:-1], ys.shape[-1])).transpose(-1, -2)
    return -(ALPHA / (ys.shape[-1] * yq.shape[-1])) * (same - p_at_ys)


def _closed_form_contrastive_grad(model: BilevelModel, params: Params, batch: TaskBatch) -> Params:
    """θ-gradient of the §3.1 loss ``−(α/(n_s n_q)) Σ_{s,q} (1[y_s=y_q] − sg(p_q[y_s])) k(s,q)``,
    mean over tasks."""
    enc = _encoder_leaves(params)
    phi_s, phi_q = _task_features(model, enc, batch)
    p_q = _zero_head_predictions(phi_s, batch.support_y, phi_q).detach()
    weights = _closed_form_pair_weights(batch.support_y, batch.query_y, p_q)
    loss = (weights * (phi_s @ phi_q.transpose(-1, -2) + 1.0)).sum((-1, -2)).mean()
    return _prefixed(enc, torch.autograd.grad(loss, list(enc.values())))


def _first_order_query_surrogate_grad(
    model: BilevelModel, params: Params, batch: TaskBatch, *, adapt: str, steps: int
) -> Params:
    """θ-gradient of the one-sided surrogate ``Σ_q sg(g_q)ᵀ sg(W_T − W_0) φ_q`` (mean over tasks).

    ``Σ_{t,s} C_t[s,q] φ_s = (W_T − W_0)ᵀ g_q`` (eq. 1), so this is ``Σ sg(C) ⟨sg(φ_s), φ_q⟩``:
    the contrastive surrogate with the support side stopped. Under first order the adapted
    encoder is ``θ + const``, so the gradient is taken w.r.t. ``θ_T`` as a leaf. The adapted
    weights come from a plain first-order loop (``torch.autograd.grad`` without graph).
    """
    adapted = [k for k in params if adapt == "all" or is_head(k)]
    total: Params = {k: torch.zeros_like(v) for k, v in params.items() if not is_head(k)}
    tasks = batch.support_x.shape[0]
    for i in range(tasks):
        fast = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(steps):
            loss_s = F.cross_entropy(functional_call(model, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss_s, [fast[k] for k in adapted])
            fast.update({k: (fast[k] - ALPHA * g).detach().requires_grad_(True) for k, g in zip(adapted, grads)})
        logits = functional_call(model, fast, (batch.query_x[i],))
        g_q = (torch.softmax(logits, -1) - F.one_hot(batch.query_y[i], WAYS).to(DTYPE)) / logits.shape[0]
        delta_w = fast[HEAD_WEIGHT] - params[HEAD_WEIGHT]
        enc = {k: fast[k] for k in total}
        phi_q = _features(model, encoder_part(enc), batch.query_x[i])
        surrogate = ((g_q.detach() @ delta_w.detach()) * phi_q).sum() / tasks
        for k, g in zip(total, torch.autograd.grad(surrogate, list(enc.values()))):
            total[k] = total[k] + g
    return total


# ------------------------------------------------------------------------------------- claims
@check
def claim1_reconstruction() -> list[ClaimResult]:
    """Eq. (1), rebuilt from the engine's inner-loop trace and adapted query features, equals
    the query logits of the model adapted by plain autograd (:func:`reference_adapt`), and the
    engine's own logged ``reconstruction_error`` is at round-off: SO/FO × head/all × T ∈ {1, 3}.
    The value is the larger of the two errors."""
    model, params, batch = _problem(seed=1)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    rows = []
    for order, adapt, steps in itertools.product(ORDERS, ADAPTS, STEPS):
        algo = _maml(model, adapt=adapt, order=order, steps=steps)
        errors = [float(algo.meta_grad(params, batch, decompose=True).decomposition.reconstruction_error)]
        for i in range(batch.support_x.shape[0]):
            inner = algo.inner_loop(params, Support(batch.support_y[i], images=batch.support_x[i]), algo.config.inner)
            rebuilt = reconstruct_logits(inner.head.trace, model.encode(inner.encoder, batch.query_x[i]))
            fast = reference_adapt(model, leaves, batch.support_x[i], batch.support_y[i],
                                   steps=steps, lr=ALPHA, adapt=adapt, first_order=order == "first_order")
            errors.append(max_abs(rebuilt - functional_call(model, fast, (batch.query_x[i],))))
        rows.append(ClaimResult(
            "1", f"{_tag(adapt, order, steps)}: max |z_q(eq. 1, engine trace) − z_q(autograd-adapted)| ∨ logged",
            max(errors), ROUNDOFF,
        ))
    return rows


@check
def claim2_identity() -> list[ClaimResult]:
    """Σ terms equals an independent plain-autograd unrolled MAML hypergradient (all params)."""
    model, params, batch = _problem(seed=2)
    rows = []
    for order, adapt, steps in itertools.product(ORDERS, ADAPTS, STEPS):
        step = _maml(model, adapt=adapt, order=order, steps=steps).meta_grad(params, batch, decompose=True)
        ref = reference_hypergradient(model, params, batch, adapt=adapt, order=order, steps=steps)
        rows.append(ClaimResult(
            "2", f"{_tag(adapt, order, steps)}: ‖Σ terms − autograd MAML‖/‖autograd MAML‖",
            rel_err(_term_sum(step), ref, list(ref)), ROUNDOFF,
        ))
    return rows


@check
def claim3_zero_head_contrastive() -> list[ClaimResult]:
    """One-step head-only SO MAML at ``W_0 = 0, b_0 = 0`` is the §3.1 contrastive loss."""
    model, params, batch = _problem(seed=3)
    head = params[HEAD_WEIGHT]
    params = _with_head(params, torch.zeros_like(head), torch.zeros(WAYS, dtype=DTYPE))
    step = _maml(model, adapt="head", order="second_order", steps=1).meta_grad(params, batch, decompose=True)
    terms = step.decomposition.terms
    closed = _closed_form_contrastive_grad(model, params, batch)
    enc = list(closed)

    phi_s, phi_q = _task_features(model, encoder_part(params), batch)
    weights = _closed_form_pair_weights(
        batch.support_y, batch.query_y, _zero_head_predictions(phi_s, batch.support_y, phi_q)
    )
    engine_weights = step.decomposition.pair_weights[:, 0]
    return [
        ClaimResult("3", "SO head T=1 W0=0: total meta-grad (encoder) vs ∇ closed-form contrastive loss",
                    rel_err(step.grad, closed, enc), ROUNDOFF),
        ClaimResult("3", "SO head T=1 W0=0: contrastive term (encoder) vs ∇ closed-form contrastive loss",
                    rel_err(terms["contrastive"], closed, enc), ROUNDOFF),
        ClaimResult("3", "SO head T=1 W0=0: pair weights vs −α/(n_s n_q)(1[y_s=y_q] − p_q[y_s]), rel. max",
                    max_abs(engine_weights - weights) / max_abs(weights), ROUNDOFF),
        ClaimResult("3", "SO head T=1 W0=0: init term (encoder) max abs",
                    _max_abs_over(terms["init"], enc), 0.0, "=="),
        ClaimResult("3", "SO head T=1 W0=0: coefficient term (encoder) max abs",
                    _max_abs_over(terms["coefficient"], enc), 0.0, "=="),
    ]


def _support_input_gradient(model: BilevelModel, params: Params, batch: TaskBatch, *, adapt: str,
                            first_order: bool, steps: int) -> float:
    """``max |∂L_Q/∂x_s|`` through the engine's inner loop (``sgd_steps``), by plain autograd
    w.r.t. the support inputs (0 when the loss does not depend on them). The parameters
    require grad too, so the query loss always has a graph."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    xs = batch.support_x.clone().requires_grad_(True)
    losses = []
    for i in range(xs.shape[0]):
        order = "first_order" if first_order else "second_order"
        inner = sgd_steps(model, params, Support(batch.support_y[i], images=xs[i]),
                          InnerConfig(steps, ALPHA, adapt=adapt, order=order))
        logits = readout(model.encode(inner.encoder, batch.query_x[i]), inner.head.weight, inner.head.bias)
        losses.append(F.cross_entropy(logits, batch.query_y[i]))
    (grad,) = torch.autograd.grad(torch.stack(losses).mean(), xs, allow_unused=True)
    return 0.0 if grad is None else max_abs(grad)


@check
def claim4_first_order_one_sided() -> list[ClaimResult]:
    """First order: support features get no gradient; the contrastive term is the one-sided
    (query-side) surrogate's gradient; the coefficient term is 0."""
    model, params, batch = _problem(seed=4)
    rows = []
    so_support = []
    for adapt, steps in itertools.product(ADAPTS, STEPS):
        tag = _tag(adapt, "first_order", steps)
        step = _maml(model, adapt=adapt, order="first_order", steps=steps).meta_grad(params, batch, decompose=True)
        terms = step.decomposition.terms
        one_sided = _first_order_query_surrogate_grad(model, params, batch, adapt=adapt, steps=steps)
        rows += [
            ClaimResult("4", f"{tag}: contrastive (encoder) vs ∇ Σ sg(C)⟨sg(φ_s), φ_q⟩, rel.",
                        rel_err(terms["contrastive"], one_sided, list(one_sided)), ROUNDOFF),
            ClaimResult("4", f"{tag}: coefficient term (all params) max abs",
                        _max_abs_over(terms["coefficient"], list(terms["coefficient"])), 0.0, "=="),
            ClaimResult("4", f"{tag}: max |∂L_Q/∂x_support| through sgd_steps",
                        _support_input_gradient(model, params, batch, adapt=adapt, first_order=True,
                                                steps=steps), 0.0, "=="),
        ]
        so_support.append(_support_input_gradient(model, params, batch, adapt=adapt, first_order=False,
                                                  steps=steps))
    rows.append(ClaimResult("4", "non-vacuity: SO max |∂L_Q/∂x_support|, min over head/all × T∈{1,3}",
                            min(so_support), 1e-6, ">="))
    return rows


@check
def claim5_pair_weight_signs() -> list[ClaimResult]:
    """At ``W_0 = 0`` same-class pairs attract (C < 0) and different-class pairs repel (C > 0)."""
    model, params, batch = _problem(seed=5, tasks=4)
    params = _with_head(params, torch.zeros_like(params[HEAD_WEIGHT]), torch.zeros(WAYS, dtype=DTYPE))
    decomposition = _maml(model, adapt="head", order="second_order", steps=1).meta_grad(
        params, batch, decompose=True).decomposition
    weights = decomposition.pair_weights[:, 0]
    same = decomposition.same_class
    return [
        ClaimResult("5", "SO head T=1 W0=0: max C[s,q] over same-class pairs (< 0: attract)",
                    float(weights[same].max()), 0.0, "<"),
        ClaimResult("5", "SO head T=1 W0=0: min C[s,q] over different-class pairs (> 0: repel)",
                    float(weights[~same].min()), 0.0, ">"),
    ]


def _limit_init_gradient(model: BilevelModel, params: Params, batch: TaskBatch) -> Params:
    """``D = ∇_θ Σ_q sg(g_q(0))ᵀ W φ_q`` (mean over tasks): the v → 0 limit of ``init(v)/v``
    for the head ``(vW, vb)``, with ``g_q(0)`` from the closed-form zero-head adaptation (§3.1)."""
    enc = _encoder_leaves(params)
    phi_s, phi_q = _task_features(model, enc, batch)
    p_q = _zero_head_predictions(phi_s, batch.support_y, phi_q).detach()
    g_q = (p_q - F.one_hot(batch.query_y, WAYS).to(DTYPE)) / phi_q.shape[-2]
    surrogate = ((g_q @ params[HEAD_WEIGHT]) * phi_q).sum() / phi_q.shape[0]
    return _prefixed(enc, torch.autograd.grad(surrogate, list(enc.values())))


@check
def claim6_init_interference_scale() -> list[ClaimResult]:
    """Init interference is linear in the head scale v to first order, and exactly 0 at v = 0.

    With the head ``(vW, vb)`` the init term is ``init(v) = v Σ_q g_q(v)ᵀ W dφ_q``; ``g_q``
    depends on v, so ``init(v)/v = D + O(v)`` with ``D`` the v → 0 limit computed independently
    (:func:`_limit_init_gradient`). Measured: ``dev(v) = ‖init(v)/v − D‖/‖D‖`` (encoder), which
    must be at most v (first-order law, constant ≤ 1), and must shrink linearly:
    ``dev(0.1)/dev(0.25) = 0.4`` within 5%. One-step head-only SO MAML, everything else fixed.
    """
    model, params, batch = _problem(seed=6)
    algo = _maml(model, adapt="head", order="second_order", steps=1)
    limit = _limit_init_gradient(model, params, batch)
    enc = list(limit)
    norm_limit = math.sqrt(sum(float((limit[k] ** 2).sum()) for k in enc))
    weight, bias = params[HEAD_WEIGHT], params[HEAD_BIAS]
    rows, dev = [], {}
    for v in (1.0, 0.5, 0.25, 0.1, 0.0):
        init = algo.meta_grad(_with_head(params, v * weight, v * bias), batch,
                              decompose=True).decomposition.terms["init"]
        if v == 0.0:
            rows.append(ClaimResult("6", "SO head T=1, v=0: init term (encoder) max abs",
                                    _max_abs_over(init, enc), 0.0, "=="))
            continue
        dev[v] = rel_err({k: init[k] / v for k in enc}, limit, enc)
        norm = math.sqrt(sum(float((init[k] ** 2).sum()) for k in enc))
        rows.append(ClaimResult(
            "6", f"SO head T=1, v={v}: ‖init/v − D‖/‖D‖ ≤ v  (‖init‖/v={norm / v:.4e}, ‖D‖={norm_limit:.4e})",
            dev[v], v,
        ))
    rows.append(ClaimResult("6", "deviation is O(v): |dev(0.1)/dev(0.25) / 0.4 − 1|",
                            abs(dev[0.1] / dev[0.25] / 0.4 - 1.0), 0.05))
    return rows


def _permutation_head_grads(algo, params: Params, batch: TaskBatch) -> Tensor:
    """The head's meta-gradient ``[N!, N, d + 1]`` (weight | bias) for every relabelling
    ``y → π(y)`` of the (single-task) batch."""
    grads = []
    for perm in itertools.permutations(range(WAYS)):
        pi = torch.tensor(perm)
        relabelled = labelled_batch(batch.support_x, pi[batch.support_y], batch.query_x, pi[batch.query_y], WAYS)
        grad = algo.meta_grad(params, relabelled).grad
        grads.append(torch.cat([grad[HEAD_WEIGHT], grad[HEAD_BIAS].unsqueeze(-1)], dim=-1))
    return torch.stack(grads)


def _row_spread(rows: Tensor) -> float:
    """``max |row − mean row|`` over the class rows (last-but-one axis)."""
    return max_abs(rows - rows.mean(-2, keepdim=True))


@check
def claim7_label_permutation_symmetry() -> list[ClaimResult]:
    """§3.4: averaged over all N! label permutations of a task, every class row of the head's
    meta-gradient receives the same update.

    Exact when the initial head is label-symmetric (all rows of ``W_0`` equal, ``b_0`` constant:
    zeroing, or any head the symmetric average produced): relabelling then permutes the rows of
    the gradient, so the average over the group is row-constant. Measured on SO MAML, full-network
    inner loop, T = 2, N = 3, one task, ``W_0 = 1uᵀ``, ``b_0 = c1`` (u, c random); spreads are
    relative to the largest entry of one permutation's gradient. Two non-vacuity rows: one
    permutation's rows differ, and with a random (asymmetric) ``W_0`` the average is not symmetric.
    """
    model, params, batch = _problem(seed=7, tasks=1)
    algo = _maml(model, adapt="all", order="second_order", steps=2)
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(params[HEAD_WEIGHT].shape[-1], generator=gen, dtype=DTYPE)
    symmetric = _with_head(params, u.expand(WAYS, -1).clone(), torch.full((WAYS,), 0.3, dtype=DTYPE))
    grads = _permutation_head_grads(algo, symmetric, batch)
    scale = max_abs(grads[0])
    asymmetric = _permutation_head_grads(algo, params, batch)
    return [
        ClaimResult("7", "SO all T=2, symmetric W0: max row deviation of the N!-average head meta-grad (rel.)",
                    _row_spread(grads.mean(0)) / scale, ROUNDOFF),
        ClaimResult("7", "non-vacuity: same, one permutation (identity) alone (rel.)",
                    _row_spread(grads[0]) / scale, 1e-3, ">="),
        ClaimResult("7", "scope: random asymmetric W0, N!-average still differs across rows (rel.)",
                    _row_spread(asymmetric.mean(0)) / max_abs(asymmetric[0]), 1e-3, ">="),
    ]
