"""Declared comparisons (:mod:`bilevel.report.study_claims`): the verdict rule, Holm's family, arms
matched by their declared settings, interactions paired or Welch, every test step, and the per-seed
file that a report can be recomputed from. Expected numbers are computed here from the values the
fake runs hold (numpy, scipy's t distribution), never taken from the code under test."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from bilevel.report.runs import RunRecord, group_runs
from bilevel.report.cli import main
from bilevel.report.seed_data import load_seed_data, write_seed_data
from bilevel.report.study import exploratory, study_markdown
from bilevel.report.study_figures import forest_figure
from bilevel.report.study_claims import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Effect, parse_declared,
                                      sign_pattern, declared_results, verdict, claims_markdown)

SEEDS = range(8)


@pytest.mark.parametrize("claim,mean,ci,p_adj,margin,expected", [
    (">", +0.05, (+0.02, +0.08), 0.01, 0.025, REPRODUCED),
    (">", -0.05, (-0.08, -0.02), 0.01, 0.025, NOT_REPRODUCED),      # significant, the other way
    (">", -0.005, (-0.03, +0.02), 0.20, 0.025, NOT_REPRODUCED),     # the CI excludes half the paper's effect
    (">", +0.005, (-0.03, +0.04), 0.20, 0.025, INCONCLUSIVE),
    (">", +0.005, (-0.03, +0.02), 0.20, None, INCONCLUSIVE),        # no paper number: no margin
    (">", +0.05, (+0.01, +0.09), 0.06, 0.025, INCONCLUSIVE),        # raw p < 0.05 is not enough: Holm's decides
    ("<", -0.05, (-0.08, -0.02), 0.01, None, REPRODUCED),
    ("<", +0.01, (-0.01, +0.03), 0.30, 0.014, NOT_REPRODUCED),
    ("=", +0.001, (-0.005, +0.008), 0.001, 0.01, REPRODUCED),       # a tiny, significant difference inside the margin
    ("=", +0.016, (+0.002, +0.030), 0.01, 0.01, NOT_REPRODUCED),
    ("=", 0.0, (-0.02, +0.02), 0.50, 0.01, INCONCLUSIVE),
])
def test_the_verdict_rule(claim, mean, ci, p_adj, margin, expected) -> None:
    assert verdict(claim, mean, ci[0], ci[1], p_adj, margin, seeds=8) == expected


@pytest.mark.parametrize("claim,ci,margin", [(">", (+0.02, +0.08), 0.025), ("=", (-0.005, +0.008), 0.01),
                                             (">", (-0.03, +0.02), 0.025)])
def test_fewer_than_eight_seeds_give_no_verdict(claim, ci, margin) -> None:
    assert verdict(claim, sum(ci) / 2, ci[0], ci[1], 0.001, margin, seeds=8) != INCONCLUSIVE
    assert verdict(claim, sum(ci) / 2, ci[0], ci[1], 0.001, margin, seeds=7) == INCONCLUSIVE


def test_a_report_on_too_few_seeds_says_why_it_gives_no_verdict() -> None:
    runs = [r for r in sweep() if r.config["seed"] < 5]
    rows = declared_results(group_runs(runs))
    assert [r.verdict for r in rows] == [INCONCLUSIVE] * 3
    assert all("**inconclusive (5 < 8 seeds)**" in line for line in claims_markdown(rows).splitlines()[2:])


def test_a_declaration_with_a_mistake_is_refused_with_its_name() -> None:
    base = {"name": "x", "a": {"head.policy": "random"}, "b": {"head.policy": "zeroing"}}
    with pytest.raises(ValueError, match="'x': claim must be one of"):
        parse_declared({**base, "claim": "≥"})
    with pytest.raises(ValueError, match="'x': claim '=' needs a margin"):
        parse_declared({**base, "claim": "="})
    with pytest.raises(ValueError, match="'x': an interaction needs across"):
        parse_declared({**base, "claim": ">", "kind": "interaction"})
    assert parse_declared({**base, "claim": ">", "paper": {"a": 0.888, "b": 0.939}}).margin == pytest.approx(0.0255)


def run(config: dict, seed: int, accuracy: float, steps: tuple[float, ...] = ()) -> RunRecord:
    metrics = {"test_accuracy": accuracy, "test_headline_step": 2.0, "test_tasks": 600.0}
    metrics.update({f"test_accuracy_step_{k}": v for k, v in enumerate(steps)})
    curve = (np.array([10, 20]), np.array([accuracy - 0.1, accuracy]))
    return RunRecord(Path(f"/runs/{len(str(config))}/{seed}"), {**config, "seed": seed}, {"eval/accuracy": curve},
                     metrics)


def head(policy: str, init: str, shots: int, study: dict) -> dict:
    return {"head": {"policy": policy, "init": init}, "data": {"shots": shots}, "study": study}


GAIN = {1: 0.04, 5: 0.01}  # zeroing's gain over the paper-init random head, per shot count


def accuracy(policy: str, init: str, shots: int, seed: int) -> float:
    base = 0.6 + 0.05 * (shots == 5) + 0.013 * ((7 * seed) % 5)
    if policy == "zeroing":
        return base + GAIN[shots] + 0.004 * ((3 * seed + shots) % 5)
    return base - 0.02 * (init == "default")


STUDY = {"name": "t", "comparisons": [
    {"name": "gain at 1 shot", "a": {"head.policy": "random", "head.init": "paper"}, "b": {"head.policy": "zeroing"},
     "where": {"data.shots": 1}, "claim": ">", "paper": {"a": 0.888, "b": 0.939}},
    {"name": "gain at 5 shots", "a": {"head.policy": "random", "head.init": "paper"}, "b": {"head.policy": "zeroing"},
     "where": {"data.shots": 5}, "claim": ">"},
    {"name": "gain shrinks", "kind": "interaction", "a": {"head.policy": "random", "head.init": "paper"},
     "b": {"head.policy": "zeroing"}, "across": {"data.shots": [5, 1]}, "claim": "<"},
]}


def sweep(seeds_at_5: range = SEEDS) -> list[RunRecord]:
    arms = [("random", "paper"), ("random", "default"), ("zeroing", "paper")]
    return [run(head(policy, init, shots, STUDY), seed, accuracy(policy, init, shots, seed),
                (0.2, 0.5 + (policy == "zeroing") * (0.1 if shots == 1 else -0.1), accuracy(policy, init, shots, seed)))
            for shots in (1, 5) for policy, init in arms for seed in (SEEDS if shots == 1 else seeds_at_5)]


def paired_t_p(d: np.ndarray) -> float:
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    return float(2 * sps.t.sf(abs(t), d.size - 1))


def gains(shots: int, seeds) -> np.ndarray:
    return np.array([accuracy("zeroing", "paper", shots, s) - accuracy("random", "paper", shots, s) for s in seeds])


def test_declared_comparisons_match_their_arms_and_are_holm_adjusted_as_one_family() -> None:
    rows = declared_results(group_runs(sweep()))
    assert [r.declared.name for r in rows] == ["gain at 1 shot", "gain at 5 shots", "gain shrinks"]
    d1, d5 = gains(1, SEEDS), gains(5, SEEDS)
    raw = [paired_t_p(d1), paired_t_p(d5), paired_t_p(d5 - d1)]
    order = np.argsort(raw)
    holm = np.empty(3)
    holm[order] = np.maximum.accumulate([min(1.0, (3 - i) * raw[j]) for i, j in enumerate(order)])
    for row, mean, p, p_holm in zip(rows, (d1.mean(), d5.mean(), (d5 - d1).mean()), raw, holm):
        assert row.effect.test == "paired t" and row.effect.n == len(SEEDS)
        assert row.effect.mean == pytest.approx(mean) and row.effect.p == pytest.approx(p)
        assert row.p_holm == pytest.approx(p_holm)
    assert [r.verdict for r in rows] == [REPRODUCED, REPRODUCED, REPRODUCED]
    assert rows[0].arms == [("data.shots=1 head.init=paper head.policy=random",
                             "data.shots=1 head.init=paper head.policy=zeroing")]


def test_an_interaction_without_shared_seeds_is_welchs_test() -> None:
    rows = declared_results(group_runs(sweep(seeds_at_5=range(10, 15))))
    (interaction,) = [r for r in rows if r.declared.name == "gain shrinks"]
    d1, d5 = gains(1, SEEDS), gains(5, range(10, 15))
    expected = sps.ttest_ind(d5, d1, equal_var=False)
    assert interaction.effect.test == "Welch t" and interaction.effect.n == 5
    assert interaction.effect.mean == pytest.approx(d5.mean() - d1.mean())
    assert interaction.effect.p == pytest.approx(expected.pvalue)


def test_every_test_step_is_compared_and_a_reversal_is_named() -> None:
    rows = declared_results(group_runs(sweep()))
    at_5 = rows[1]
    assert at_5.per_step[0].mean == 0.0 and at_5.per_step[1].mean == pytest.approx(-0.1)
    assert at_5.per_step[2].mean == pytest.approx(gains(5, SEEDS).mean())
    assert sign_pattern(at_5.per_step) == "reverses: + at step 2, − at step 1"
    effect = Effect("paired t", 5, 0.01, -0.01, 0.03, 0.3)
    assert sign_pattern([None, effect, replace(effect, mean=-0.01)]) == "mean changes sign (not significant)"
    assert sign_pattern([replace(effect, mean=-1.0, p=0.001), effect, effect]) == "same sign"  # step 0 left out


def test_exploratory_pairs_leave_out_the_declared_differences_only() -> None:
    groups = group_runs(sweep())
    pairs = {(c.key, c.a, c.b, c.context) for c in exploratory(groups)}
    assert ("head.init", "paper", "default", "data.shots=1 head.policy=random") in pairs
    assert not any(key == "head.policy" and "data.shots=1" in context for key, _, _, context in pairs)


def test_the_per_seed_file_recomputes_the_report(tmp_path: Path) -> None:
    runs = sweep()
    path = tmp_path / "t.seeds.json"
    write_seed_data(runs, path)
    assert study_markdown(group_runs(load_seed_data(path))) == study_markdown(group_runs(runs))
    assert "Declared comparisons" in study_markdown(group_runs(runs))


def test_the_forest_plot_has_a_row_per_declared_comparison_and_none_without() -> None:
    fig = forest_figure(group_runs(sweep()))
    (ax,) = fig.axes
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == ["gain shrinks", "gain at 5 shots",
                                                                          "gain at 1 shot"]
    undeclared = [RunRecord(r.path, {k: v for k, v in r.config.items() if k != "study"}, r.scalars, r.metrics)
                  for r in sweep()]
    assert forest_figure(group_runs(undeclared)) is None


def test_the_report_refuses_a_malformed_declaration_with_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = {**STUDY, "comparisons": [{**STUDY["comparisons"][0], "claim": "≥"}]}
    runs = [RunRecord(r.path, {**r.config, "study": bad}, r.scalars, r.metrics) for r in sweep()]
    path = tmp_path / "bad.seeds.json"
    write_seed_data(runs, path)
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'gain at 1 shot': claim must be one of >, <, =" in err and "Traceback" not in err


def test_a_declared_preset_name_frees_the_fields_of_its_preset() -> None:
    """``ablation.name`` picks a preset whose fields (``keep``) differ too: the arms still pair, and
    a key outside the preset (the inner steps) must still agree."""
    study = {"name": "t", "comparisons": [{"name": "surrogate", "a": {"ablation.name": "none"},
                                           "b": {"ablation.name": "contrastive_only"}, "claim": "=", "margin": 0.01}]}
    presets = {"none": {"name": "none", "keep": None}, "contrastive_only": {"name": "contrastive_only",
                                                                           "keep": ["contrastive"]}}
    runs = [run({"ablation": presets[name], "algorithm": {"inner_steps": steps}, "study": study}, seed,
                0.9 + 0.001 * seed + 0.002 * (name == "none") + 0.01 * steps)
            for name in presets for steps in (1, 2) for seed in SEEDS]
    rows = declared_results(group_runs(runs))
    assert len(rows) == 2 and all(r.effect.n == len(SEEDS) for r in rows)
    assert all(r.effect.mean == pytest.approx(-0.002) for r in rows)
