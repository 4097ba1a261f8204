"""``bilevel-report``: run discovery, grouping by setting, statistics, table, figures, errors.

Fake run directories (2 settings × 2 seeds) are written with ``SummaryWriter`` from known
values; the expected means and sample standard deviations are computed here by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image
from scipy.stats import t as t_dist
from torch.utils.tensorboard import SummaryWriter

from bilevel.report.runs import RunRecord, find_runs, group_runs, load_run
from bilevel.report.tables import summarise
from bilevel.report.cli import main

STEPS = (10, 20, 30)
# setting -> seed -> known values
EVAL = {"zeroing": {0: (0.2, 0.5, 0.4), 1: (0.3, 0.6, 0.6)}, "random": {0: (0.1, 0.2, 0.3), 1: (0.2, 0.2, 0.2)}}
TEST = {"zeroing": {0: (0.45, 0.50), 1: (0.55, 0.60)}, "random": {0: (0.30, 0.20), 1: (0.40, 0.30)}}
COS = {"zeroing": {0: (0.8, 0.1), 1: (0.6, 0.3)}, "random": {0: (0.5, 0.4), 1: (0.7, 0.2)}}


def config(policy: str, seed: int, resume: bool = False) -> dict:
    return {
        "algorithm": {"name": "maml", "order": "second_order", "inner_lr": 0.4},
        "ablation": {"name": "none", "keep": None, "drop": []},
        "head": {"policy": policy, "scale": 1.0},
        "train": {"steps": STEPS[-1], "resume": resume},
        "seed": seed,
    }


def write_run(path: Path, policy: str, seed: int, resume: bool = False) -> None:
    (path / "tb").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config(policy, seed, resume)))
    test, zeroed = TEST[policy][seed]
    (path / "metrics.json").write_text(json.dumps({"test_accuracy": test, "test_zeroed_accuracy": zeroed}))
    same, diff = COS[policy][seed]
    writer = SummaryWriter(str(path / "tb"))
    for i, (step, acc) in enumerate(zip(STEPS, EVAL[policy][seed])):
        writer.add_scalar("eval/accuracy", acc, step)
        writer.add_scalar("features/cos_same_class", same * (i + 1) / len(STEPS), step)
        writer.add_scalar("features/cos_diff_class", diff * (i + 1) / len(STEPS), step)
        writer.add_scalar("terms/contrastive/share", 0.7, step)
        writer.add_scalar("terms/init/share", 0.3, step)
    writer.close()


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A Hydra-like sweep: run dirs at different depths, a resumed run, a config-only dir."""
    root = tmp_path / "sweep"
    write_run(root / "head.policy=zeroing,seed=0", "zeroing", 0)
    write_run(root / "head.policy=zeroing,seed=1", "zeroing", 1, resume=True)
    write_run(root / "random" / "seed=0", "random", 0)
    write_run(root / "random" / "nested" / "seed=1", "random", 1)
    hydra_dir = root / "head.policy=zeroing,seed=0" / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config("zeroing", 0)))
    return root


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_load_run_reads_config_scalars_metrics(sweep: Path) -> None:
    run = load_run(sweep / "head.policy=zeroing,seed=1")
    assert run.config["head"]["policy"] == "zeroing" and run.config["seed"] == 1
    steps, values = run.scalars["eval/accuracy"]
    assert steps.tolist() == list(STEPS)
    assert values.tolist() == pytest.approx(EVAL["zeroing"][1], abs=1e-6)
    assert run.metrics == {"test_accuracy": 0.55, "test_zeroed_accuracy": 0.60}
    assert run.last_step == STEPS[-1]


def test_resumed_run_keeps_the_last_value_per_step(tmp_path: Path) -> None:
    write_run(tmp_path / "run", "zeroing", 0)
    writer = SummaryWriter(str(tmp_path / "run" / "tb"))
    writer.add_scalar("eval/accuracy", 0.9, STEPS[-1])
    writer.add_scalar("eval/accuracy", 0.8, STEPS[-1] + 10)
    writer.close()
    steps, values = load_run(tmp_path / "run").scalars["eval/accuracy"]
    assert steps.tolist() == list(STEPS) + [STEPS[-1] + 10]
    assert values.tolist() == pytest.approx(list(EVAL["zeroing"][0][:-1]) + [0.9, 0.8], abs=1e-6)


def test_grouping_by_setting_ignores_seed_and_resume(sweep: Path) -> None:
    runs = find_runs([sweep])
    assert len(runs) == 4
    groups = group_runs(runs)
    assert sorted(g.label for g in groups) == ["head.policy=random", "head.policy=zeroing"]
    for g in groups:
        assert sorted(r.config["seed"] for r in g.runs) == [0, 1]


def test_label_keys_name_group_option_instead_of_its_contents() -> None:
    def record(ablation: dict, order: str) -> RunRecord:
        cfg = {"ablation": ablation, "algorithm": {"name": "maml", "order": order}, "seed": 0}
        return RunRecord(Path("."), cfg, {}, {})

    none = {"name": "none", "keep": None, "drop": []}
    no_init = {"name": "no_init", "keep": None, "drop": ["init"]}
    runs = [record(none, "first_order"), record(no_init, "first_order"), record(none, "second_order")]
    labels = [g.label for g in group_runs(runs)]
    assert labels == [
        "ablation.name=none algorithm.order=first_order",
        "ablation.name=no_init algorithm.order=first_order",
        "ablation.name=none algorithm.order=second_order",
    ]
    assert [g.label for g in group_runs(runs[:1])] == ["all runs"]


def test_statistics_over_seeds(sweep: Path) -> None:
    rows = {s.label: s for s in map(summarise, group_runs(find_runs([sweep])))}
    for policy in ("zeroing", "random"):
        row = rows[f"head.policy={policy}"]
        assert row.seeds == 2 and row.steps == [30, 30]
        checks = {
            "final_eval_accuracy": [EVAL[policy][s][-1] for s in (0, 1)],
            "best_eval_accuracy": [max(EVAL[policy][s]) for s in (0, 1)],
            "test_accuracy": [TEST[policy][s][0] for s in (0, 1)],
            "test_zeroed_accuracy": [TEST[policy][s][1] for s in (0, 1)],
            "cos_same_class": [COS[policy][s][0] for s in (0, 1)],
            "cos_diff_class": [COS[policy][s][1] for s in (0, 1)],
        }
        for name, xs in checks.items():
            stat = getattr(row, name)
            mean, sd = mean_sd(xs)
            assert (stat.mean, stat.sd, stat.n) == (pytest.approx(mean, abs=1e-6), pytest.approx(sd, abs=1e-6), 2), name


def test_cli_table_markdown_json_and_figures(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    md, js = tmp_path / "out" / "table.md", tmp_path / "out" / "report.json"
    main([str(sweep), "--markdown", str(md), "--json", str(js)])
    printed = capsys.readouterr().out
    table = md.read_text()
    assert table.startswith(printed[:printed.index("\n\n")])  # the same table first
    assert "### Arms" in table and "### Arms" not in printed  # the study's (repeating) arms table: for docs/results
    lines = table.splitlines()
    assert lines[0].startswith("| setting") and set(lines[1]) <= {"|", "-"}
    zeroing_row = next(line for line in lines if "head.policy=zeroing" in line)
    cells = [c.strip() for c in zeroing_row.strip("|").split("|")]
    mean, sd = mean_sd([0.4, 0.6])
    assert cells[:4] == ["head.policy=zeroing", "2", "30", f"{mean:.3f} ± {sd:.3f}"]
    assert any("head.policy=random" in line for line in lines)
    assert {row["label"] for row in json.loads(js.read_text())} == {"head.policy=zeroing", "head.policy=random"}

    figures = sorted(p.name for p in (sweep / "report").iterdir() if p.suffix == ".png")
    assert figures == ["decomposition_shares.png", "feature_cosines.png", "learning_curves.png"]
    assert (sweep / "report" / "report.html").is_file()
    for name in figures:
        path = sweep / "report" / name
        assert path.stat().st_size > 1000
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"


def test_empty_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no run directory" in err and "config.yaml" in err and "tb/" in err


def test_per_step_test_accuracy_and_the_headline_step_are_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "run", "zeroing", 0)
    metrics = {"test_accuracy": 0.5, "test_headline_step": 2, "test_accuracy_step_0": 0.2,
               "test_accuracy_step_1": 0.45, "test_accuracy_step_2": 0.5, "test_accuracy_step_3": 0.48}
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    main([str(tmp_path / "run"), "--out", str(tmp_path / "figures")])
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert row["test acc after k steps"] == "0.500" and row["k"] == "2"
    assert row["test acc per step 0 / 1 / ..."] == "0.200 / 0.450 / 0.500 / 0.480"


def test_runs_shorter_than_the_decomposition_cadence_are_named_in_a_warning(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "short", "zeroing", 0)
    cfg = config("zeroing", 0)
    cfg["train"].update(steps=20, decompose_every=25)
    (tmp_path / "short" / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_run(tmp_path / "long", "random", 0)
    main([str(tmp_path), "--out", str(tmp_path / "figures")])
    err = capsys.readouterr().err
    assert "warning: 1 of 2 runs are shorter than train.decompose_every (25)" in err
    assert str((tmp_path / "short").resolve()) in err and str((tmp_path / "long").resolve()) not in err


def test_a_test_accuracy_shows_its_interval_over_seeds_or_else_over_test_tasks(sweep: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    def rows(path: Path) -> dict[str, dict[str, str]]:
        main([str(path), "--out", str(tmp_path / "figures")])
        out = capsys.readouterr().out
        lines = out[:out.index("\n\n")].splitlines()  # the settings table, before the study's
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        body = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
        return {row["setting"]: row for row in body}

    mean, sd = mean_sd([TEST["zeroing"][s][0] for s in (0, 1)])
    half = t_dist.ppf(0.975, 1) * sd / math.sqrt(2)
    zeroing = rows(sweep)["head.policy=zeroing"]
    assert zeroing["test acc after k steps"] == f"{mean:.3f} ± {sd:.3f} [{mean - half:.3f}, {mean + half:.3f}]"
    eval_mean, eval_sd = mean_sd([EVAL["zeroing"][s][-1] for s in (0, 1)])
    assert zeroing["final eval acc"] == f"{eval_mean:.3f} ± {eval_sd:.3f}"  # no interval for the eval columns

    write_run(tmp_path / "one", "zeroing", 0)
    metrics = {"test_accuracy": 0.5, "test_accuracy_low": 0.46, "test_accuracy_high": 0.54, "test_zeroed_accuracy": 0.4}
    (tmp_path / "one" / "metrics.json").write_text(json.dumps(metrics))
    one = rows(tmp_path / "one")["all runs"]
    assert one["test acc after k steps"] == "0.500 ± 0.040 †" and one["test acc (zeroed head)"] == "0.400"
