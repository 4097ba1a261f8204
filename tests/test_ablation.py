"""Ablation: the cheap kept-terms path equals the combination of independently computed terms."""
from __future__ import annotations

import pytest
import torch

from bilevel import Want
from bilevel.decomposition.ablation import resolve_ablation
from bilevel.testing import rel_err


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("order", ["second_order", "first_order"])
@pytest.mark.parametrize("keep", [("contrastive",), ("contrastive", "coefficient"), ("init",), ("contrastive_query",)])
def test_ablated_meta_grad_equals_the_sum_of_the_kept_terms(make_problem, adapt, order, keep):
    problem = make_problem("mlp", head="random")
    algo = problem.algorithm(adapt=adapt, order=order, inner_steps=2)
    for execution in algo.executions:
        algo = algo.with_execution(execution)
        terms = algo.terms
        if "contrastive_query" in keep:
            terms = ("contrastive_query", "contrastive_support", "init", "coefficient")
        full = algo.meta_step(problem.params, problem.batch, Want(terms=terms))
        expected = {
            k: full.grad[k] if k.startswith("head.") else sum(full.decomposition.terms[t][k] for t in keep)
            for k in full.grad
        }
        cheap = algo.ablated_meta_grad(problem.params, problem.batch, keep)
        assert rel_err(cheap.grad, expected) < 1e-12
        assert torch.equal(cheap.loss, full.loss)


def test_dropping_everything_is_an_error(make_problem):
    algo = make_problem("mlp").algorithm()
    with pytest.raises(ValueError, match="keeps no term"):
        resolve_ablation(["init"], ["init"], algo)


def test_splitting_contrastive_is_refused_when_the_algorithm_cannot(make_problem):
    algo = make_problem("mlp").algorithm()
    algo.splits_contrastive = False
    with pytest.raises(ValueError, match="cannot split"):
        resolve_ablation(None, ["contrastive_support"], algo)
