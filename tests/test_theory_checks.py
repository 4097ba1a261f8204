"""The theory-check runner and the MAML claims (docs/theory.md §7, claims 1–7).

The claims pass on the engine as it is; a deliberately broken term (the contrastive
cotangent scaled by 1.01) makes the identity claim fail and the runner exit non-zero; a
mis-recorded head trace makes the reconstruction claim fail; a check that raises becomes a
FAIL row instead of crashing the run.
"""
from __future__ import annotations

import json
import math

import pytest

import bilevel.solvers.sgd
import bilevel.hypergrad.rows
from bilevel.decomposition.cotangents import Nodes, term_cotangents
from bilevel.primitives.head import HeadState, head_write
from theory_checks import __main__ as runner
from theory_checks import maml_claims
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

    monkeypatch.setattr(bilevel.solvers.sgd, "head_write", misrecorded)
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
