"""The theory-check runner and the MAML claims (docs/theory.md §7, claims 1–7).

The claims pass on the engine as it is; a deliberately broken term (the contrastive
cotangent scaled by 1.01) makes the identity claim fail and the runner exit non-zero; a
mis-recorded head trace makes the reconstruction claim fail; R2-D2 without its ``+ λI`` fails
its closed form and meta-gradient, Meta-SGD that ignores its learned rates fails every rate claim;
a check that raises becomes a FAIL row instead of crashing the run.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import algorithms.meta_sgd
import algorithms.r2d2
import bilevel.solvers.steps
import bilevel.hypergrad.rows
from bilevel.decomposition.cotangents import Nodes, term_cotangents
from bilevel.primitives.head import HeadState, head_write
from theory_checks import __main__ as runner
from algorithms.meta_sgd import learning_rates
from theory_checks import maml_claims, meta_sgd_claims, r2d2_claims
from theory_checks.core import ClaimResult

MAML_ONLY = "theory_checks.maml_claims."


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if " PASS " in line or " FAIL " in line]


def test_maml_claims_pass_and_json_has_one_row_per_claim(tmp_path, capsys):
    path = tmp_path / "claims.json"
    assert runner.main(["--only", MAML_ONLY, "--json", str(path)]) == 0
    table = _table_rows(capsys.readouterr().out)
    rows = json.loads(path.read_text())
    assert len(rows) == len(table) > 0
    assert {r["claim"] for r in rows} == {str(i) for i in range(1, 8)}
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    assert all(r["check"].startswith(MAML_ONLY) for r in rows)
    assert set(rows[0]) == {"claim", "check", "description", "value", "threshold", "compare", "passed"}


def test_json_to_stdout_parses(capsys):
    assert runner.main(["--only", "claim5_pair_weight_signs", "--json", "-"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["claim"] for r in rows] == ["5", "5"]
    assert len(_table_rows(captured.err)) == 2


def _scaled_contrastive(*args, **kwargs) -> dict[str, Nodes]:
    out = term_cotangents(*args, **kwargs)
    c = out["contrastive"]
    out["contrastive"] = c._replace(query_features=1.01 * c.query_features, features=tuple(1.01 * f for f in c.features))
    return out


def test_broken_contrastive_term_fails_identity(monkeypatch, capsys):
    monkeypatch.setattr(bilevel.hypergrad.rows, "term_cotangents", _scaled_contrastive)
    rows = maml_claims.claim2_identity()
    assert len(rows) == 8 and not any(r.passed for r in rows)
    assert min(r.value for r in rows) > 1e-4
    assert runner.main(["--only", "claim2_identity"]) == 1
    assert len(_table_rows(capsys.readouterr().out)) == 8


def test_misrecorded_trace_fails_reconstruction(monkeypatch):
    """A trace whose coefficients are off by 1 % (the materialised head stays right)."""

    def misrecorded(state: HeadState, features, coeff) -> HeadState:
        written = head_write(state, features, coeff)
        wrong = head_write(state, features, 1.01 * coeff)
        return HeadState(written.weight, written.bias, wrong.trace)

    monkeypatch.setattr(bilevel.solvers.steps, "head_write", misrecorded)
    rows = maml_claims.claim1_reconstruction()
    assert len(rows) == 8 and not any(r.passed for r in rows)


def test_raising_check_is_a_fail_row(monkeypatch, tmp_path):
    def broken() -> list[ClaimResult]:
        raise RuntimeError("boom")

    def fine() -> list[ClaimResult]:
        return [ClaimResult("x", "fine", 0.0, 0.0, "==")]

    monkeypatch.setattr(runner, "CHECKS", [broken, fine])
    path = tmp_path / "rows.json"
    assert runner.main(["--only", "test_theory_checks.", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())
    assert [(r["claim"], r["passed"]) for r in rows] == [("error", False), ("x", True)]
    assert "RuntimeError: boom" in rows[0]["description"] and rows[0]["value"] is None


def test_no_match_exits_2():
    assert runner.main(["--only", "no-such-check"]) == 2


@pytest.mark.parametrize("compare,value,passed", [
    ("<", 0.0, False), ("<", -1e-300, True), (">", 0.0, False), ("==", 0.0, True),
    ("<=", math.nan, False), (">=", math.nan, False), ("==", math.nan, False),
])
def test_claim_result_comparisons(compare, value, passed):
    assert ClaimResult("c", "d", value, 0.0, compare).passed is passed


def test_claim_result_rejects_unknown_comparison():
    with pytest.raises(ValueError, match="compare must be one of"):
        ClaimResult("c", "d", 0.0, 0.0, "~")


def _ridge_without_lambda(features, labels, ways, lam):
    """R2-D2's dual solve with the ``+ λI`` dropped: ``(ΦΦᵀ + 1)⁻¹ Y``."""
    onehot = (labels.unsqueeze(-1) == torch.arange(ways)).to(features.dtype)
    return torch.linalg.solve(features @ features.transpose(-1, -2) + 1.0, onehot)


def test_r2d2_without_its_ridge_term_fails_the_closed_form_and_the_meta_gradient(monkeypatch, capsys):
    monkeypatch.setattr(algorithms.r2d2, "ridge_coefficients", _ridge_without_lambda)
    head, trace = r2d2_claims.r2d2_closed_form_and_trace()
    assert not head.passed and head.value > 1e-3
    assert trace.passed  # the trace still explains whatever head was written
    failed = [r.description for r in r2d2_claims.r2d2_meta_gradient() if not r.passed]
    assert len(failed) == 2 and all("primal ridge head" in d for d in failed)
    assert runner.main(["--only", "r2d2_claims"]) == 1


def test_meta_sgd_that_ignores_its_rates_fails_the_rate_claims(monkeypatch):
    """The inner loop steps with the initial rate ``α`` whatever the learned rates are: MAML at
    uniform rates (so that claim still holds), wrong everywhere the rates matter."""
    def fixed_rates(params):
        rates, head = learning_rates(params)
        return {k: torch.full_like(v, meta_sgd_claims.ALPHA) for k, v in rates.items()}, torch.full_like(
            head, meta_sgd_claims.ALPHA)

    monkeypatch.setattr(algorithms.meta_sgd, "learning_rates", fixed_rates)
    assert all(r.passed for r in meta_sgd_claims.meta_sgd_uniform_rates_are_maml())
    rows = meta_sgd_claims.meta_sgd_learned_rates()
    assert len(rows) == 5 and not any(r.passed for r in rows)
    assert runner.main(["--only", "meta_sgd_claims"]) == 1
