"""Panels and report a user can read: one TensorBoard run per line of a chart (each its own colour,
named in the run selector), images numbered like the scalars, HPARAMS of a sweep with the swept keys
only, the console's identity check and run header, and the self-contained ``report.html``."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata

from bilevel import tags
from bilevel.report import cli as report_cli
from bilevel.report import runs as report_runs
from bilevel.app.config.naming import Naming
from bilevel.report.figures import task_bounds
from bilevel.report.html import markdown_html
from bilevel.app.summary import identity_line
from bilevel.app.tb.logger import RunLogger
from bilevel.run_files import event_files
from bilevel.app.tb.hparams import HPARAM_KEYS, hparam_summaries
from bilevel.app.train import train
from bilevel.data import glyphs
from test_train import config

pytestmark = pytest.mark.usefixtures("single_thread")

# (tag as the code names it, nested run, tag as written): spelled out by hand
PLACED = [
    ("terms/contrastive/share", "term=contrastive", "terms/share"),
    ("terms/coefficient/norm", "term=coefficient", "terms/norm"),
    ("terms/total/norm", "term=total", "terms/norm"),
    ("terms/init/cos_total", "term=init", "terms/cos_total"),
    ("eval/accuracy_step_2", "test_step=2", "eval/accuracy_per_step"),
    ("test_zeroed/accuracy_step_0", "test_step=0", "test_zeroed/accuracy_per_step"),
    ("test/ci95_step_3", "test_step=3", "test/ci95_per_step"),
    ("checks/log10_identity", "check=identity", "checks/log10_error"),
    ("checks/log10_reconstruction", "check=reconstruction", "checks/log10_error"),
    ("pairs/same_class_weight", "class=same", "pairs/weight"),
    ("pairs/diff_class_weight", "class=different", "pairs/weight"),
    ("features/cos_same_class", "class=same", "features/cos"),
    ("features/cos_diff_class", "class=different", "features/cos"),
    ("train/loss", "", "train/loss"),
    ("eval/accuracy", "", "eval/accuracy"),
    ("eval/accuracy_low", "", "eval/accuracy_low"),
]


@pytest.mark.parametrize("tag, nested, written", PLACED)
def test_each_line_of_a_chart_is_a_nested_run_and_reads_back(tag, nested, written):
    assert tags.placement(tag) == (nested, written)
    assert tags.logical(nested, written) == tag


def _nested_runs(run_dir: Path) -> dict[str, set[str]]:
    """nested run → scalar tags written in it ('' for the run itself)."""
    out: dict[str, set[str]] = {}
    for path in event_files(run_dir):
        nested = path.parent.name if len(path.relative_to(run_dir / "tb").parts) == 3 else ""
        for event in LegacyEventFileLoader(str(path)).Load():
            out.setdefault(nested, set()).update(v.tag for v in event.summary.value if v.HasField("simple_value"))
    return out


def test_logger_writes_nested_runs_the_report_reads_back_and_a_resume_keeps_them(tmp_path):
    logger = RunLogger(tmp_path, "head.policy=random")
    for step in (1, 2, 3):
        logger.scalars({"terms/contrastive/share": 0.1 * step, "terms/init/share": 1 - 0.1 * step,
                        "checks/log10_identity": -7.0, "train/loss": 2.0 / step}, step)
    logger.flush()
    checkpoint_time = time.time()
    logger.close()
    runs = _nested_runs(tmp_path)
    assert runs == {"": {"train/loss"}, "term=contrastive": {"terms/share"}, "term=init": {"terms/share"},
                    "check=identity": {"checks/log10_error"}}
    assert (tmp_path / "tb" / "head.policy=random" / "term=contrastive").is_dir()
    resumed = RunLogger(tmp_path, "head.policy=random", resume=(2, checkpoint_time))  # keeps steps 1, 2
    resumed.scalars({"terms/contrastive/share": 0.9}, 3)
    resumed.close()
    scalars = report_runs.load_scalars(tmp_path)
    assert scalars["terms/contrastive/share"][0].tolist() == [1, 2, 3]
    assert scalars["terms/contrastive/share"][1].tolist() == pytest.approx([0.1, 0.2, 0.9])
    assert scalars["terms/init/share"][0].tolist() == [1, 2]
    assert scalars["checks/log10_identity"][1].tolist() == [-7.0, -7.0]
    assert len(event_files(tmp_path)) == len(_nested_runs(tmp_path))  # one file per nested run: the old ones went


def test_hparams_of_a_sweep_hold_only_the_swept_keys():
    values = {"head.policy": "random", "seed": 1, "algorithm": "maml", "data": "glyphs", "train.steps": 150}

    def infos(sweep: bool) -> list[tuple[str, bool]]:
        summary = hparam_summaries(values, ["head.policy"], ["test/accuracy"], "random", sweep)[0]
        parsed = hparams_metadata.parse_experiment_plugin_data(summary.value[0].metadata.plugin_data.content)
        return [(i.name, i.differs) for i in parsed.hparam_infos]

    assert infos(sweep=True) == [("head.policy", True)]  # equal in every run of the sweep: not shown
    single = infos(sweep=False)
    assert single[0] == ("head.policy", True) and {n for n, _ in single[1:]} == {"seed", "algorithm", "data",
                                                                                    "train.steps"} & set(HPARAM_KEYS)


def test_identity_line_says_round_off_or_not():
    fine = {tags.CHECK_IDENTITY: 3.1e-7, tags.CHECK_RECONSTRUCTION: 2e-6}
    assert identity_line(fine, torch.float32).endswith("= 3.1e-07, reconstruction 2.0e-06: round-off (below 1e-05 "
                                                         "in float32)")
    assert "ABOVE round-off" in identity_line(fine, torch.float64)
    assert "float32 round-off" not in identity_line(fine, torch.float64)
    assert "ABOVE round-off" in identity_line({**fine, tags.CHECK_IDENTITY: float("nan")}, torch.float32)
    assert "float32 round-off" not in identity_line({**fine, tags.CHECK_IDENTITY: float("nan")}, torch.float32)
    above = identity_line({**fine, tags.CHECK_IDENTITY: 1.7e-5}, torch.float32)
    assert "ABOVE round-off" in above and "cpu_conv=native" in above and "dtype=float64" in above


def test_console_names_the_preset_and_ablation_and_says_every_identity_check(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    naming = Naming("anil", choices=(("ablation", "contrastive_only"), ("algorithm", "anil")))
    train(config("algorithm=anil", "head.policy=random", "ablation=contrastive_only", "train.steps=4",
                 "train.decompose_every=2", "train.image_every=2"), tmp_path, show_progress=False, naming=naming)
    text = caplog.text
    title = "anil (maml, adapt=head) on synthetic 5-way 1-shot (2 inner steps, 3 at test), ablation " \
            "contrastive_only: the encoder follows contrastive"
    assert f"training {title} for 4 outer steps" in text and f"finished {title}: 4 steps" in text
    checks = re.findall(r"step (\d+): decomposition identity check .* = ([0-9.e+-]+), reconstruction", text)
    assert [int(s) for s, _ in checks] == [1, 3]  # steps 0 and 2 (from 0) are the 1st and 3rd
    assert all(float(v) < 1e-5 for _, v in checks)


def test_glyph_build_is_announced_before_it_starts(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    said: list[bool] = []

    def build(path, seed, image_size):
        said.append("building the glyphs data set" in caplog.text)
        return torch.zeros(1, 1, image_size, image_size), ()

    monkeypatch.setattr(glyphs, "_build_cache", build)
    glyphs.load_glyphs(tmp_path, 0, 12)
    assert said == [True]


def _fake_run(path: Path, seed: int, test: float, low: float, high: float) -> None:
    from torch.utils.tensorboard import SummaryWriter

    (path / "tb").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"head": {"policy": "zeroing"}, "seed": seed,
                                                      "train": {"steps": 30, "decompose_every": 10}}))
    (path / "metrics.json").write_text(json.dumps({"test_accuracy": test, "test_accuracy_low": low,
                                                   "test_accuracy_high": high, "test_tasks": 200}))
    writer = SummaryWriter(str(path / "tb" / "run"))
    shares = {term: SummaryWriter(str(path / "tb" / "run" / f"term={term}")) for term in ("contrastive", "init")}
    for step, acc in ((0, 0.2), (30, 0.8)):
        writer.add_scalar("eval/accuracy", acc, step)
        writer.add_scalar("eval/accuracy_low", acc - 0.05, step)
        writer.add_scalar("eval/accuracy_high", acc + 0.05, step)
        for term, share in zip(shares, (0.7, 0.3)):
            shares[term].add_scalar("terms/share", share, step + 1)
    for w in (writer, *shares.values()):
        w.close()


def test_one_seed_shows_its_interval_over_test_tasks_and_says_so(tmp_path, capsys):
    _fake_run(tmp_path / "run", 0, 0.80, 0.78, 0.82)
    report_cli.main([str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "0.800 ± 0.020 †" in out and "† one seed: ± is the half-width of the run's 95 % CI over its test tasks" in out
    assert out.count("| setting") == 1  # one table of the settings, not two
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "0.800 ± 0.020 †" in page and "<table>" in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)  # self-contained: every image embedded
    figures = sorted(p.name for p in (tmp_path / "run" / "report").glob("*.png"))
    assert figures == ["decomposition_shares.png", "learning_curves.png"]  # the shares read from term=<name> runs
    assert page.count("data:image/png;base64,") == len(figures)


def test_several_seeds_show_mean_sd_and_the_t_interval(tmp_path, capsys):
    _fake_run(tmp_path / "a", 0, 0.70, 0.6, 0.8)
    _fake_run(tmp_path / "b", 1, 0.80, 0.7, 0.9)
    report_cli.main([str(tmp_path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    sd = 0.1 / 2 ** 0.5
    half = 12.706204736 * sd / 2 ** 0.5  # t(0.975, 1 degree of freedom)
    assert f"0.750 ± {sd:.3f} [{0.75 - half:.3f}, {0.75 + half:.3f}]" in out


def test_markdown_tables_and_headings_become_html():
    page = markdown_html("### Arms\n\n| a | b |\n|---|---|\n| 1 < 2 | x |\n\nnote")
    assert page == ("<h2>Arms</h2>\n<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1 &lt; 2</td>"
                    "<td>x</td></tr></tbody></table>\n<p>note</p>")


def test_learning_curve_of_one_seed_draws_its_task_interval(tmp_path, capsys):
    _fake_run(tmp_path / "run", 0, 0.80, 0.78, 0.82)
    runs = report_runs.find_runs([tmp_path / "run"])
    bounds = task_bounds(runs, tags.accuracy(tags.EVAL))
    assert bounds is not None and bounds[0].tolist() == pytest.approx([0.15, 0.75])
    report_cli.main([str(tmp_path / "run")])
    with Image.open(tmp_path / "run" / "report" / "learning_curves.png") as image:
        assert image.format == "PNG"


def test_path_timing_is_announced_before_it_starts(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))  # nothing measured yet
    train(config("execution=auto", "train.steps=1"), tmp_path / "run", show_progress=False)
    text = caplog.text
    assert "timing the ways of running tasks" in text and "measured now" in text
    assert text.index("timing the ways of running tasks") < text.index("measured now")
