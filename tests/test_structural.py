"""Structurally zero terms (``bilevel.decomposition.structural``): every term the rules call zero is exactly 0
in a real decomposition, and every other term is not — for every algorithm and head policy."""
from __future__ import annotations

import pytest

from bilevel import Want, build_algorithm
from bilevel.decomposition.ablation import resolve_ablation
from bilevel.primitives.params import is_head
from bilevel.decomposition.structural import idle_ablation_warning, structural_zeros

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "maml 1 step": {"name": "maml", "inner_steps": 1},
    "maml 2 steps": {"name": "maml", "inner_steps": 2},
    "fomaml": {"name": "maml", "order": "first_order", "inner_steps": 2},
    "anil 1 step": {"name": "maml", "adapt": "head", "inner_steps": 1},
    "anil 2 steps": {"name": "maml", "adapt": "head", "inner_steps": 2},
    "imaml": {"name": "imaml", "inner_steps": 3, "cg_iters": 3, "inner_lr": 0.1},
    "entropy_sgd": {"name": "entropy_sgd", "inner_steps": 2, "noise": 0.1},
}


def encoder_norm(term) -> float:
    return sum(float(v.pow(2).sum()) for k, v in term.items() if not is_head(k)) ** 0.5


@pytest.mark.parametrize("policy, head", [("zeroing", "zero"), ("random", "random")])
@pytest.mark.parametrize("name", CONFIGS)
def test_the_terms_called_structurally_zero_are_exactly_zero_and_no_other(make_problem, name, policy, head):
    problem = make_problem("mlp", head=head)
    algorithm = build_algorithm({**CONFIGS[name]}, problem.model)
    resolve_ablation(None, [], algorithm)
    zeros = structural_zeros(algorithm, policy)
    terms = algorithm.meta_grad(problem.params, problem.batch, decompose=True).decomposition.terms
    norms = {t: encoder_norm(v) for t, v in terms.items()}
    assert {t for t, n in norms.items() if n == 0.0} == set(zeros), norms


def test_one_sided_split_at_first_order_has_a_zero_support_side(make_problem):
    problem = make_problem("mlp", head="random")
    algorithm = build_algorithm(CONFIGS["fomaml"], problem.model)
    ablation = resolve_ablation(None, ["contrastive_support"], algorithm)
    terms = algorithm.meta_step(problem.params, problem.batch, Want(terms=ablation.terms)).decomposition.terms
    zeros = structural_zeros(algorithm, "random", ablation.terms)
    assert "contrastive_support" in zeros and encoder_norm(terms["contrastive_support"]) == 0.0
    assert encoder_norm(terms["contrastive_query"]) > 0


@pytest.mark.parametrize("name, policy, warned", [
    ("anil 1 step", "zeroing", True),      # the paper's case: init and coefficient are both 0
    ("maml 1 step", "zeroing", True),
    ("maml 2 steps", "zeroing", False),    # the coefficient path is live from the second step
    ("anil 1 step", "random", False),
])
def test_contrastive_only_is_flagged_when_it_removes_only_zero_terms(make_problem, name, policy, warned):
    problem = make_problem("mlp")
    algorithm = build_algorithm(CONFIGS[name], problem.model)
    ablation = resolve_ablation(["contrastive"], [], algorithm)
    warning = idle_ablation_warning(ablation, algorithm, structural_zeros(algorithm, policy), "contrastive_only")
    assert (warning is not None) == warned
    if warned:
        assert "removes only init, coefficient" in warning and "trains the plain algorithm" in warning
