"""The exact decomposition of the MAML meta-gradient (docs/theory.md §2, §3, §3.1–§3.3).

The oracle here is built from plain autograd and shares nothing with the engine but the
model: it runs the inner loop with ``functional_call`` + ``F.cross_entropy``, takes the
coefficients ``A_t = −α ∂L_S/∂Z_S`` and ``g_q = ∂L_Q/∂z_q`` by ``torch.autograd.grad``, and
differentiates each term's surrogate (docs/theory.md §3 table)

    contrastive   Σ_t Σ_{s,q} sg(C_t[s,q]) (⟨Φ_t[s], φ_q⟩ + 1),   C_t[s,q] = g_q · A_t[s]
    init          Σ_q sg(g_q)ᵀ (W_0 φ_q + b_0)
    coefficient   Σ_t Σ_{s,q} sg(g_q)ᵀ A_t[s] sg(⟨Φ_t[s], φ_q⟩ + 1)

with ``Φ_t`` the support features of inner step ``t`` (taken at ``θ_t``) and ``φ_q`` the
query features at ``θ_T``; first order holds ``Φ_t`` and ``A_t`` constant. The sum of the
engine's terms is also compared with the plain MAML gradient of the reference loop, which
knows nothing of surrogates: that is what catches an incomplete trace.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel.primitives.params import ENCODER_PREFIX, encoder_part

pytestmark = pytest.mark.usefixtures("single_thread")

TERMS = ("contrastive", "init", "coefficient")
GRID = [
    (name, order, adapt, steps, head)
    for name in ("mlp", "conv4")
    for order in ("second_order", "first_order")
    for adapt in ("all", "head")
    for steps in (1, 3)
    for head in ("random", "zero")
]


def norm(tree):
    return sum(float(v.pow(2).sum()) for v in tree.values()) ** 0.5


def diff_norm(a, b):
    assert a.keys() == b.keys()
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5


def encoder_nonzeros(tree):
    return sum(int(torch.count_nonzero(v)) for k, v in tree.items() if k.startswith(ENCODER_PREFIX))


def grads_of(surrogate, wrt):
    """``∂ surrogate / ∂ wrt`` as a dict; exact zeros when the surrogate does not depend on them."""
    if not surrogate.requires_grad:
        return {k: torch.zeros_like(v) for k, v in wrt.items()}
    grads = torch.autograd.grad(surrogate, list(wrt.values()), retain_graph=True, allow_unused=True,
                                materialize_grads=True)
    return dict(zip(wrt, grads))


def oracle(problem, reference, *, steps, adapt, first_order):
    """Per-term gradients, pair weights ``[T, steps, n_s, n_q]``, feature cosines and (full-network
    second order) the encoder-adaptation part, all from the surrogates by plain autograd."""
    model, b, lr = problem.model, problem.batch, problem.inner_lr
    leaves = {k: v.clone().requires_grad_() for k, v in problem.params.items()}
    tasks = b.support_y.shape[0]
    surrogates = dict.fromkeys(TERMS, torch.zeros((), dtype=b.query_x.dtype))
    pairs, cosines, leaf_parts = [], [], []
    for i in range(tasks):
        xs, ys, xq, yq = b.support_x[i], b.support_y[i], b.query_x[i], b.query_y[i]
        fast, feats, coeffs, path = dict(leaves), [], [], []
        for _ in range(steps):
            logits_s = functional_call(model, fast, (xs,))
            (dz,) = torch.autograd.grad(F.cross_entropy(logits_s, ys), logits_s, create_graph=not first_order)
            phi_s = functional_call(model.encoder, encoder_part(fast), (xs,))
            feats.append(phi_s.detach() if first_order else phi_s)
            coeffs.append(-lr * dz)
            path.append(encoder_part(fast))
            fast = reference.adapt(model, fast, xs, ys, steps=1, lr=lr, adapt=adapt, first_order=first_order)
        phi_q = functional_call(model.encoder, encoder_part(fast), (xq,))
        logits_q = functional_call(model, fast, (xq,))
        (g,) = torch.autograd.grad(F.cross_entropy(logits_q, yq), logits_q, retain_graph=True)
        weights = [(a @ g.T).detach() for a in coeffs]
        for phi_s, a, c in zip(feats, coeffs, weights):
            k = phi_s @ phi_q.T + 1
            surrogates["contrastive"] = surrogates["contrastive"] + (c * k).sum() / tasks
            surrogates["coefficient"] = surrogates["coefficient"] + ((k.detach() @ g) * a).sum() / tasks
        init = (g * (phi_q @ leaves["head.weight"].T + leaves["head.bias"])).sum() / tasks
        surrogates["init"] = surrogates["init"] + init
        pairs.append(torch.stack(weights))
        cosines.append(F.normalize(feats[0], dim=-1) @ F.normalize(phi_q, dim=-1).T)
        if adapt == "all" and not first_order:
            leaf_parts.append(_leaf_feature_gradient(model, path + [encoder_part(fast)], xs, xq, g, weights,
                                                     leaves["head.weight"], tasks))
    terms = {t: grads_of(s, leaves) for t, s in surrogates.items()}
    adaptation = None
    if leaf_parts:
        leaf = {k: sum(part[k] for part in leaf_parts) for k in leaf_parts[0]}
        adaptation = {
            k: (terms["contrastive"][k] + terms["init"][k] - leaf[k[len(ENCODER_PREFIX):]]).detach()
            if k.startswith(ENCODER_PREFIX) else torch.zeros_like(v)
            for k, v in leaves.items()
        }
    return terms, torch.stack(pairs), torch.stack(cosines).detach(), adaptation


def _leaf_feature_gradient(model, path, xs, xq, g, weights, weight0, tasks):
    """Contrastive + init surrogates differentiated w.r.t. every adapted encoder ``θ_t`` (and
    ``θ_T`` of the query features) as independent leaves, summed over the leaves."""
    leaves = [{k: v.detach().requires_grad_() for k, v in enc.items()} for enc in path]
    phi_q = functional_call(model.encoder, leaves[-1], (xq,))
    surrogate = (g * (phi_q @ weight0.detach().T)).sum()
    for enc, c in zip(leaves[:-1], weights):
        surrogate = surrogate + (c * (functional_call(model.encoder, enc, (xs,)) @ phi_q.T + 1)).sum()
    flat = [(k, v) for enc in leaves for k, v in enc.items()]
    grads = torch.autograd.grad(surrogate / tasks, [v for _, v in flat])
    out: dict = {}
    for (k, _), gr in zip(flat, grads):
        out[k] = out.get(k, 0) + gr
    return out


@pytest.mark.parametrize("name, order, adapt, steps, head", GRID)
def test_terms_match_independent_surrogates_and_sum_to_maml_gradient(
    make_problem, reference, rel_err, name, order, adapt, steps, head
):
    p = make_problem(name, head=head)
    first_order = order == "first_order"
    step = p.algorithm(adapt=adapt, inner_steps=steps, order=order).meta_grad(p.params, p.batch, decompose=True)
    d = step.decomposition
    assert float(d.reconstruction_error) < 1e-10
    assert float(d.identity_error) < 1e-10
    assert all(torch.equal(d.total[k], step.grad[k]) for k in step.grad)

    plain = reference.meta_grad(p.model, p.params, p.batch, steps=steps, lr=p.inner_lr, adapt=adapt,
                                first_order=first_order)
    summed = {k: sum(d.terms[t][k] for t in TERMS) for k in plain}
    assert rel_err(summed, plain) < 1e-10

    terms, pairs, cosines, adaptation = oracle(p, reference, steps=steps, adapt=adapt, first_order=first_order)
    scale = norm(plain)
    for t in TERMS:
        assert diff_norm(d.terms[t], terms[t]) < 1e-10 * scale, t
    assert d.pair_weights.shape == pairs.shape
    assert float((d.pair_weights - pairs).abs().max()) < 1e-12 * float(pairs.abs().max())
    assert torch.allclose(d.feature_cosines, cosines, rtol=0, atol=1e-12)
    assert torch.equal(d.same_class, p.batch.support_y[:, :, None] == p.batch.query_y[:, None, :])

    if adaptation is None:
        assert d.encoder_adaptation is None
    else:
        assert diff_norm(d.encoder_adaptation, adaptation) < 1e-10 * scale
    if first_order:
        assert all(torch.count_nonzero(v) == 0 for v in d.terms["coefficient"].values())
    if head == "zero":
        # The init cotangent is g_q W_0 = 0 exactly, so its encoder gradient is exactly 0.
        assert encoder_nonzeros(d.terms["init"]) == 0
        if steps == 1:
            # A_0 = −α(softmax(Φ W_0ᵀ + b_0) − Y)/n_s; with W_0 = 0 its θ-Jacobian is Φ-times-0.
            assert encoder_nonzeros(d.terms["coefficient"]) == 0
            if adaptation is not None:
                # θ_1 = θ − α J_Φᵀ G_S W_0 is bilinear in W_0: dθ_1/dθ = I at W_0 = 0, so the part
                # beyond the identity is 0 (round-off only: the engine sums the same terms in
                # another order).
                assert norm(d.encoder_adaptation) < 1e-12 * scale


@pytest.mark.parametrize("name, order, adapt, steps, head", GRID)
def test_float32_reconstruction_and_identity(make_problem, name, order, adapt, steps, head):
    p = make_problem(name, head=head, dtype=torch.float32)
    algo = p.algorithm(adapt=adapt, inner_steps=steps, order=order)
    d = algo.meta_grad(p.params, p.batch, decompose=True).decomposition
    assert float(d.reconstruction_error) < 1e-5
    assert float(d.identity_error) < 1e-5


def _features(problem, i):
    enc = encoder_part(problem.params)
    b = problem.batch
    return (functional_call(problem.model.encoder, enc, (b.support_x[i],)),
            functional_call(problem.model.encoder, enc, (b.query_x[i],)))


def test_one_step_zero_head_second_order_is_the_supervised_contrastive_loss(make_problem, rel_err):
    """docs/theory.md §3.1: A_s = (α/n_s)(e_{y_s} − 1/N), so SO-MAML's encoder gradient is the θ-gradient
    of −(α/(n_s n_q)) Σ (1[y_s=y_q] − sg(p_q[y_s])) (⟨φ_s, φ_q⟩ + 1); init and coefficient are 0."""
    p = make_problem("conv4", head="zero", shots=2)
    b = p.batch
    tasks, n_s = b.support_y.shape
    n_q, ways = b.query_y.shape[1], p.ways
    d = p.algorithm(adapt="head").meta_grad(p.params, b, decompose=True).decomposition
    leaves = {k: v.clone().requires_grad_() for k, v in p.params.items()}
    loss = 0.0
    for i in range(tasks):
        phi_s = functional_call(p.model.encoder, encoder_part(leaves), (b.support_x[i],))
        phi_q = functional_call(p.model.encoder, encoder_part(leaves), (b.query_x[i],))
        a = p.inner_lr / n_s * (F.one_hot(b.support_y[i], ways).to(phi_s.dtype) - 1 / ways)
        p_q = torch.softmax(phi_q @ (a.T @ phi_s).T + a.sum(0), dim=-1).detach()
        same = (b.support_y[i][:, None] == b.query_y[i][None, :]).to(phi_s.dtype)
        weight = -p.inner_lr / (n_s * n_q) * (same - p_q[:, b.support_y[i]].T)
        assert float((d.pair_weights[i, 0] - weight).abs().max()) < 1e-12 * float(weight.abs().max())
        loss = loss + (weight * (phi_s @ phi_q.T + 1)).sum() / tasks
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                                      materialize_grads=True)))
    assert rel_err(d.terms["contrastive"], expected) < 1e-10
    assert all(torch.count_nonzero(d.terms["contrastive"][k]) == 0 for k in ("head.weight", "head.bias"))
    assert encoder_nonzeros(d.terms["init"]) == 0
    assert encoder_nonzeros(d.terms["coefficient"]) == 0
    encoder_total = {k: v for k, v in d.total.items() if k.startswith(ENCODER_PREFIX)}
    assert rel_err(encoder_total, {k: expected[k] for k in encoder_total}) < 1e-10


def test_one_step_random_head_pair_weights(make_problem):
    """docs/theory.md §3.1: C[s,q] = −(α/(n_s n_q))(1[y_s=y_q] − p_q[y_s] − p⁰_s[y_q] + p_q·p⁰_s)."""
    p = make_problem("mlp", shots=2)
    b = p.batch
    n_s, n_q = b.support_y.shape[1], b.query_y.shape[1]
    w0, b0 = p.params["head.weight"], p.params["head.bias"]
    d = p.algorithm(adapt="head").meta_grad(p.params, b, decompose=True).decomposition
    for i in range(b.support_y.shape[0]):
        phi_s, phi_q = _features(p, i)
        p0 = torch.softmax(phi_s @ w0.T + b0, dim=-1)
        onehot = F.one_hot(b.support_y[i], p.ways).to(p0.dtype)
        a = -p.inner_lr / n_s * (p0 - onehot)
        p_q = torch.softmax(phi_q @ (w0 + a.T @ phi_s).T + b0 + a.sum(0), dim=-1)
        same = (b.support_y[i][:, None] == b.query_y[i][None, :]).to(p0.dtype)
        weight = -p.inner_lr / (n_s * n_q) * (
            same - p_q[:, b.support_y[i]].T - p0[:, b.query_y[i]] + p0 @ p_q.T
        )
        assert float((d.pair_weights[i, 0] - weight).abs().max()) < 1e-12 * float(weight.abs().max())


@pytest.mark.parametrize("head", ["random", "zero"])
def test_first_order_contrastive_is_one_sided(make_problem, rel_err, head):
    """docs/theory.md §3.2: under FO the contrastive term is the gradient of the query-side surrogate
    Σ sg(C) (⟨sg(φ_s), φ_q⟩ + 1); it differs from the two-sided SO term; coefficient is 0."""
    p = make_problem("mlp", head=head)
    b = p.batch
    tasks, n_s = b.support_y.shape
    algo = lambda order: p.algorithm(adapt="head", order=order)  # noqa: E731
    d = algo("first_order").meta_grad(p.params, b, decompose=True).decomposition
    so = algo("second_order").meta_grad(p.params, b, decompose=True).decomposition
    leaves = {k: v.clone().requires_grad_() for k, v in p.params.items()}
    surrogate = 0.0
    for i in range(tasks):
        phi_s = functional_call(p.model.encoder, encoder_part(leaves), (b.support_x[i],)).detach()
        phi_q = functional_call(p.model.encoder, encoder_part(leaves), (b.query_x[i],))
        surrogate = surrogate + (d.pair_weights[i, 0] * (phi_s @ phi_q.T + 1)).sum() / tasks
    expected = dict(zip(leaves, torch.autograd.grad(surrogate, list(leaves.values()), allow_unused=True,
                                                      materialize_grads=True)))
    assert rel_err(d.terms["contrastive"], expected) < 1e-10
    assert rel_err(d.terms["contrastive"], so.terms["contrastive"]) > 1e-2
    assert all(torch.count_nonzero(v) == 0 for v in d.terms["coefficient"].values())


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_zero_head_pair_weight_signs(make_problem, adapt, steps, order):
    """At W_0 = 0, A_0 = (α/n_s)(e_{y_s} − 1/N), so C_0[s,q] = −(α/(n_s n_q))(1[y_s=y_q] − p_q[y_s]):
    strictly negative for same-class pairs (attract), strictly positive otherwise (repel)."""
    p = make_problem("mlp", head="zero")
    algo = p.algorithm(adapt=adapt, inner_steps=steps, order=order)
    d = algo.meta_grad(p.params, p.batch, decompose=True).decomposition
    first = d.pair_weights[:, 0]
    assert bool((first[d.same_class] < 0).all())
    assert bool((first[~d.same_class] > 0).all())
    summary = d.summary()
    if steps == 1:
        assert float(summary["pairs/same_class_weight"]) < 0 < float(summary["pairs/diff_class_weight"])


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_summary_keys_and_shares(make_problem, adapt, order):
    p = make_problem("mlp")
    algo = p.algorithm(adapt=adapt, inner_steps=2, order=order)
    d = algo.meta_grad(p.params, p.batch, decompose=True).decomposition
    summary = d.summary()
    expected = {f"decomp/{t}/{s}" for t in algo.terms for s in ("norm", "cos_total", "share")}
    expected |= {
        "decomp/total/norm", "decomp/check/reconstruction", "decomp/check/identity",
        "pairs/same_class_weight", "pairs/diff_class_weight",
        "features/cos_same_class", "features/cos_diff_class",
    }
    if adapt == "all" and order == "second_order":
        expected.add("decomp/encoder_adaptation/norm")
    assert expected <= set(summary)
    assert all(v.dim() == 0 for v in summary.values())
    shares = sum(float(summary[f"decomp/{t}/share"]) for t in algo.terms)
    assert shares == pytest.approx(1.0, abs=1e-8)
    weights = d.pair_weights.sum(-3)
    for key, mask in (("same", d.same_class), ("diff", ~d.same_class)):
        assert float(summary[f"pairs/{key}_class_weight"]) == pytest.approx(float(weights[mask].mean()), rel=1e-12)


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
def test_decomposition_is_the_same_on_every_execution_path(make_problem, rel_err, adapt, order):
    p = make_problem("conv4")
    algo = p.algorithm(adapt=adapt, inner_steps=2, order=order)
    results = {}
    for mode in algo.executions:
        algo = algo.with_execution(mode)
        results[mode] = algo.meta_grad(p.params, p.batch, decompose=True).decomposition
    base = results["loop"]
    scale = norm(base.total)
    for mode, d in results.items():
        for t in algo.terms:
            assert diff_norm(d.terms[t], base.terms[t]) < 1e-10 * scale, (mode, t)
        assert torch.allclose(d.pair_weights, base.pair_weights, rtol=1e-10, atol=0), mode
        assert torch.allclose(d.feature_cosines, base.feature_cosines, rtol=0, atol=1e-12), mode
        assert float(d.reconstruction_error) < 1e-10 and float(d.identity_error) < 1e-10, mode


def test_head_row_spread_is_what_the_softmax_sees():
    """``row_spread`` is the distance of (W, b) from the equal-row heads, ``‖(I − 11ᵀ/N)[W b]‖``:
    unchanged by a vector added to every row (which leaves every softmax unchanged), 0 at W = 0."""
    from bilevel.primitives.head import readout, row_spread
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    centring = torch.eye(5, dtype=torch.float64) - torch.full((5, 5), 0.2, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(centring @ torch.cat([weight, bias[:, None]], 1))
    assert torch.allclose(row_spread(weight, bias), expected, rtol=1e-14)
    shift, shift_b = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn((), generator=gen, dtype=torch.float64)
    assert torch.allclose(row_spread(weight + shift, bias + shift_b), expected, rtol=1e-12)
    features = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    assert torch.allclose(torch.softmax(readout(features, weight + shift, bias + shift_b), -1),
                          torch.softmax(readout(features, weight, bias), -1), atol=1e-14)
    assert float(row_spread(torch.zeros(5, 7), torch.zeros(5))) == 0.0
