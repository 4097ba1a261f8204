"""``bilevel-report``'s study statistics on a tiny sweep whose values are known.

A 2 (order) × 2 (head policy) sweep, seeds 0–4 (one arm misses seed 4), with known final test
accuracies, validation curves and cosine probes; every expected number is computed here with
numpy / the t table from those values, never taken from the code under test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from bilevel.report.runs import find_runs, group_runs
from bilevel.report.cli import main
from bilevel.report.study import arm_row, comparisons, cosine_comparisons, cosine_rows, zeroing_effects
from bilevel.report.study_figures import side_by_side

POLICIES, ORDERS = ("random", "zeroing"), ("first_order", "second_order")
T4 = 2.776  # t_{0.975, 4}
T3 = 3.182  # t_{0.975, 3}


def final_value(order: str, policy: str, seed: int) -> float:
    return (0.6 + (0.05 + 0.002 * seed) * (order == "second_order") + 0.03 * (policy == "zeroing")
            + 0.01 * ((3 + len(policy)) * seed % 5))


def zeroed_value(order: str, policy: str, seed: int) -> float:
    return final_value(order, policy, seed) - 0.02 * (policy == "random") + 0.001 * seed


def val_curve(order: str, policy: str, seed: int) -> list[float]:
    top = final_value(order, policy, seed)
    return [top - 0.2, top - 0.05, top + 0.01, top]  # steps 10, 20, 30, 40


def probe(policy: str, seed: int) -> dict:
    same, diff = 0.5 + 0.1 * (policy == "zeroing") + 0.01 * seed, 0.3 - 0.02 * seed
    qs = np.full((5, 5), diff) + np.eye(5) * (same - diff)
    return {"protocol": {"steps": [1, 11]}, "steps": {"1": {"query_support": qs.tolist(), "query_query": qs.tolist()},
                                                       "11": {"query_support": (qs + 0.1).tolist(),
                                                              "query_query": qs.tolist()}}}


def share_value(seed: int, step: int) -> float:
    return 0.25 + 0.01 * seed - 0.001 * step


def write_run(path: Path, order: str, policy: str, seed: int) -> None:
    (path / "tb").mkdir(parents=True)
    cfg = {"algorithm": {"name": "maml", "order": order}, "head": {"policy": policy}, "train": {"steps": 40},
           "seed": seed}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.json").write_text(json.dumps({
        "test_accuracy": final_value(order, policy, seed), "test_zeroed_accuracy": zeroed_value(order, policy, seed),
        "test_headline_step": 2, "test_tasks": 600, "test_accuracy_step_0": 0.2,
        "test_accuracy_step_1": 0.5, "test_accuracy_step_2": final_value(order, policy, seed)}))
    if order == "second_order":
        recorded = probe(policy, seed)
        if (policy, seed) == ("random", 4):
            del recorded["steps"]["11"]  # a run still in progress: its step-11 map is not there yet
        (path / "cosine_probe.json").write_text(json.dumps(recorded))
    writer = SummaryWriter(str(path / "tb"))
    for step, acc in zip((10, 20, 30, 40), val_curve(order, policy, seed)):
        writer.add_scalar("eval/accuracy", acc, step)
        if policy == "random":
            writer.add_scalar("terms/init/share", share_value(seed, step), step)
            writer.add_scalar("pairs/same_class_weight", -0.5 * seed, step)
        writer.add_scalar("train/head_norm", 0.1 * step, step)
        writer.add_scalar("train/head_row_spread", 0.05 * step + seed, step)
    writer.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    for order in ORDERS:
        for policy in POLICIES:
            for seed in range(5):
                if (order, policy, seed) == ("first_order", "random", 4):
                    continue  # an unfinished arm: 4 seeds
                write_run(root / f"algorithm.order={order},head.policy={policy},seed={seed}", order, policy, seed)
    return root


def groups_of(sweep: Path):
    return {g.label: g for g in group_runs(find_runs([sweep]))}


def test_arm_statistics_over_seeds(sweep: Path) -> None:
    row = arm_row(groups_of(sweep)["algorithm.order=second_order head.policy=zeroing"])
    xs = np.array([final_value("second_order", "zeroing", s) for s in range(5)])
    half = T4 * xs.std(ddof=1) / math.sqrt(5)
    assert row.seeds == [0, 1, 2, 3, 4] and row.finished == 5 and row.headline_steps == [2] and row.test_tasks == [600]
    assert row.test.mean == pytest.approx(xs.mean()) and row.test.sd == pytest.approx(xs.std(ddof=1))
    assert row.test.ci_low == pytest.approx(xs.mean() - half, abs=1e-4)
    best = [max(val_curve("second_order", "zeroing", s)) for s in range(5)]  # best: on the validation curve
    last = [val_curve("second_order", "zeroing", s)[-1] for s in range(5)]
    assert row.val_best.mean == pytest.approx(np.mean(best)) and row.val_final.mean == pytest.approx(np.mean(last))
    # last quarter of 40 steps: the value at step 30 (<= 0.75 * 40) to step 40
    assert row.val_change_last_quarter.mean == pytest.approx(-0.01)
    assert [s.mean for s in row.test_per_step][:2] == pytest.approx([0.2, 0.5])


def test_paired_comparisons_use_the_shared_seeds(sweep: Path) -> None:
    found = {(c.key, c.context): c for c in comparisons(list(groups_of(sweep).values()))}
    assert len(found) == 4  # 2 policy pairs (one per order) + 2 order pairs (one per policy)
    c = found[("head.policy", "algorithm.order=first_order")]
    assert (c.a, c.b) == ("random", "zeroing") and c.result.seeds == (0, 1, 2, 3)
    d = np.array([final_value("first_order", "zeroing", s) - final_value("first_order", "random", s) for s in range(4)])
    assert c.result.diff.mean == pytest.approx(d.mean()) and c.result.wins == int((d > 0).sum())
    assert c.result.t == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    assert c.result.diff.ci_high == pytest.approx(d.mean() + T3 * d.std(ddof=1) / 2, abs=1e-4)


def test_test_time_zeroing_is_paired_within_runs(sweep: Path) -> None:
    effects = dict(zeroing_effects(list(groups_of(sweep).values())))
    random = effects["algorithm.order=second_order head.policy=random"]
    d = np.array([zeroed_value("second_order", "random", s) - final_value("second_order", "random", s) for s in range(5)])
    assert random.n == 5 and random.diff.mean == pytest.approx(d.mean()) and random.wins == 0


def test_cosine_rows_and_gap_comparisons(sweep: Path) -> None:
    groups = list(groups_of(sweep).values())
    rows = {(r.label, r.step): r for r in cosine_rows(groups)}
    assert {step for _, step in rows} == {1, 11}
    z = rows[("algorithm.order=second_order head.policy=zeroing", 1)].values
    same = [0.6 + 0.01 * s for s in range(5)]
    diff = [0.3 - 0.02 * s for s in range(5)]
    assert z["same"].mean == pytest.approx(np.mean(same)) and z["diff"].mean == pytest.approx(np.mean(diff))
    assert z["gap"].mean == pytest.approx(np.mean(same) - np.mean(diff))
    compared = [(s, c) for s, c in cosine_comparisons(groups) if c.key == "head.policy"]
    assert {s for s, _ in compared} == {1, 11}
    assert all(c.result.diff.mean == pytest.approx(0.1) for _, c in compared)
    assert sorted((s, c.result.n) for s, c in compared) == [(1, 5), (11, 4)]  # seed 4 of random lacks step 11
    assert rows[("algorithm.order=second_order head.policy=random", 11)].values["gap"].n == 4


def test_decomposition_rows_average_over_training_then_seeds(sweep: Path) -> None:
    from bilevel.report.study import decomposition_rows
    rows = {r.label: r for r in decomposition_rows(list(groups_of(sweep).values()))}
    assert set(rows) == {"algorithm.order=first_order head.policy=random", "algorithm.order=second_order head.policy=random"}
    row = rows["algorithm.order=second_order head.policy=random"]
    per_run = [np.mean([share_value(s, t) for t in (10, 20, 30, 40)]) for s in range(5)]
    assert row.shares["init"].mean == pytest.approx(np.mean(per_run)) and row.shares["init"].sd == pytest.approx(np.std(per_run, ddof=1))
    assert row.pair_weights["same_class_weight"].mean == pytest.approx(-1.0) and row.pair_weights["diff_class_weight"] is None
    assert row.head_norm_last.mean == pytest.approx(4.0)
    assert row.head_row_spread_last.mean == pytest.approx(2.0 + np.mean(range(5)))
    assert row.head_row_spread_last.sd == pytest.approx(np.std(range(5), ddof=1))


def test_small_differences_are_not_printed_as_zero() -> None:
    from bilevel.report.study import signed
    assert (signed(0.0123), signed(-3.2e-6), signed(0.0)) == ("+0.012", "-3.2e-06", "+0.000")


def test_side_by_side_map_is_ways_by_2ways_plus_1() -> None:
    m = side_by_side(np.ones((5, 5)), np.zeros((5, 5)))
    assert m.shape == (5, 11) and np.isnan(m[:, 5]).all() and m[:, :5].sum() == 25 and m[:, 6:].sum() == 0


def test_cli_writes_statistics_json_and_figures(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    md = tmp_path / "table.md"
    main([str(sweep), "--out", str(tmp_path / "fig"), "--markdown", str(md)])
    text = md.read_text()
    printed = capsys.readouterr().out
    assert text.replace(text[text.index("### Arms"):text.index("### Exploratory")], "") in printed  # arms: --markdown only
    assert "Exploratory: paired comparisons" in text and "Wilcoxon p" in text and "Cosine probe" in text
    assert "Declared comparisons" not in text  # this sweep declares none
    study = json.loads((tmp_path / "fig" / "study.json").read_text())
    assert len(study["arms"]) == 4 and len(study["comparisons"]) == 4 and study["cosine"]
    for name in ("learning_curves.png", "cosine_heatmaps.png"):
        with Image.open(tmp_path / "fig" / name) as image:
            image.verify()
            assert image.format == "PNG"
