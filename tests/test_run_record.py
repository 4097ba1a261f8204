"""What a run says about itself: the summary and the log file, per-step accuracies with
confidence intervals in ``metrics.json``, the evaluation budget, and the TensorBoard record
(custom-scalars layout, descriptions, structurally zero terms logged once, images at the
final step, HPARAMS with the swept keys first)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from bilevel.app.evaluation import ci95
from bilevel.tags import logical
from bilevel.run_files import event_files
from bilevel.app.tb.hparams import HPARAM_KEYS
from bilevel.app.config.naming import Naming
from bilevel.app.attempt import HPARAM_METRICS
from bilevel.app.train import train
from test_errors import cli_env
from test_train import config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def events(run_dir: Path) -> list:
    """``(nested run, event)`` of every event file of the run (nested: ``""`` for the run itself)."""
    return [(path.parent.name if len(path.relative_to(run_dir / "tb").parts) == 3 else "", e)
            for path in event_files(run_dir) for e in LegacyEventFileLoader(str(path)).Load()]


def values(run_dir: Path, tag: str) -> list:
    """``(step, value)`` of ``tag`` as the code names it (:func:`bilevel.tags.logical`)."""
    return [(e.step, v) for nested, e in events(run_dir) for v in e.summary.value if logical(nested, v.tag) == tag]


def test_cli_prints_a_summary_and_keeps_what_it_printed_in_train_log(tmp_path):
    env = cli_env(str(ROOT), tmp_path / "cache")
    args = ["data=synthetic", "model=mlp", "model.hidden=8", "algorithm.inner_steps=2", "train.steps=4",
            "train.eval_every=2", "eval.tasks=6", "eval.batch=3", "eval.final_tasks=9", "device=cpu"]
    done = subprocess.run([sys.executable, "-m", "bilevel.app.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run_dir = next((tmp_path / "outputs").glob("*/*"))  # outputs/<date>/<time>: one clock reading
    out = done.stdout
    assert "finished maml on synthetic 5-way 1-shot (2 inner steps, 3 at test): 4 steps in" in out
    assert "test accuracy after 2 inner steps: " in out and "(95 % CI over 9 tasks of the test split; chance 0.200)" in out
    assert "head as trained" in out and "zeroed head" in out
    assert f"run directory: {run_dir.resolve()}" in out
    assert f"TensorBoard:   tensorboard --logdir {run_dir.resolve() / 'tb'}" in out
    log = (run_dir / "train.log").read_text()
    assert all(line in log for line in out.splitlines() if line.strip()), "train.log holds what the console showed"
    (name,) = [p.name for p in (run_dir / "tb").iterdir()]  # the run is named after its command line
    assert name.startswith("data=synthetic,model=mlp,model.hidden=8,algorithm.inner_steps=2") and len(name) <= 80


def test_metrics_hold_every_test_step_with_its_confidence_interval(tmp_path):
    metrics = train(config("algorithm.inner_steps=2", "eval.batch=2", "eval.final_tasks=6"), tmp_path,
                    show_progress=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["test_headline_step"] == 2 and metrics["test_tasks"] == 6
    assert metrics["test_accuracy"] == metrics["test_accuracy_step_2"]
    for prefix in ("test", "test_zeroed"):
        for k in range(4):
            assert 0 <= metrics[f"{prefix}_accuracy_step_{k}"] <= 1 and metrics[f"{prefix}_ci95_step_{k}"] >= 0
        half = metrics[f"{prefix}_ci95_step_2"]
        assert metrics[f"{prefix}_accuracy_low"] == pytest.approx(metrics[f"{prefix}_accuracy"] - half)
        assert metrics[f"{prefix}_accuracy_high"] == pytest.approx(metrics[f"{prefix}_accuracy"] + half)
    assert metrics["test_zeroed_accuracy_step_0"] == pytest.approx(0.2)  # a zero head guesses label 0


def test_ci95_is_1_96_standard_errors_over_tasks():
    accs = torch.tensor([[0.2, 0.5], [0.4, 0.7], [0.6, 0.9]], dtype=torch.float64)
    assert ci95(accs).tolist() == pytest.approx([1.96 * 0.2 / 3 ** 0.5] * 2)
    assert ci95(accs[:1]).tolist() == [0.0, 0.0]


def test_a_time_budget_takes_a_prefix_of_the_fixed_task_sequence(tmp_path):
    common = ("eval.batch=2", "eval.tasks=6", "train.eval_every=6", "eval.final_tasks=2")
    train(config(*common, "eval.budget_s=0"), tmp_path / "all", show_progress=False)
    train(config(*common, "eval.budget_s=1e-9"), tmp_path / "budget", show_progress=False)
    assert [v.simple_value for _, v in values(tmp_path / "all", "eval/tasks")] == [6.0, 6.0]  # at steps 0 and 6
    assert [v.simple_value for _, v in values(tmp_path / "budget", "eval/tasks")] == [2.0, 2.0]  # one batch, at least


def test_tensorboard_has_the_layout_descriptions_and_logs_zero_terms_once(tmp_path):
    train(config("head.policy=zeroing", "algorithm.inner_steps=1", "train.decompose_every=2",
                 "train.image_every=4", "train.steps=7"), tmp_path, show_progress=False)
    layout = values(tmp_path, "custom_scalars__config__")
    assert len(layout) == 1
    parsed = layout_pb2.Layout.FromString(layout[0][1].tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in parsed.category for c in cat.chart}
    assert [cat.title for cat in parsed.category][0].startswith("1. accuracy")
    first = values(tmp_path, "eval/accuracy")[0][1]
    assert "Headline" in first.metadata.summary_description
    # init and coefficient are exactly 0 here (zeroing, one step): logged once, at step 1, with the reason
    for tag in ("terms/init/share", "terms/coefficient/norm"):
        points = values(tmp_path, tag)
        assert [s for s, _ in points] == [1] and points[0][1].simple_value == 0.0
        assert "Exactly 0 under this configuration" in points[0][1].metadata.summary_description
    # the decomposition of the n-th step is logged at n, like its loss; its images too, the last at the last step
    assert [s for s, _ in values(tmp_path, "terms/contrastive/share")] == [1, 3, 5, 7]
    assert values(tmp_path, "terms/structurally_zero/text_summary")
    assert all(v.simple_value < -5 for _, v in values(tmp_path, "checks/log10_identity"))
    assert [s for s, _ in values(tmp_path, "pairs/weights")] == [1, 5, 7]
    assert values(tmp_path, "train/loss")[-1][0] == 7  # the last image is numbered like the last scalars
    assert [s for s, _ in values(tmp_path, "eval/accuracy")] == [0, 3, 6, 7]  # the start, every eval_every, the end
    spread = values(tmp_path, "train/head_row_spread")
    assert spread and all(v.simple_value >= 0 for _, v in spread)
    assert "softmax sees" in spread[0][1].metadata.summary_description
    # a chart of several lines draws one tag written by one nested run per line: its own colour, named
    lines = {title: {nested for nested, e in events(tmp_path) for v in e.summary.value
                     if v.HasField("simple_value") and any(re.search(t, v.tag) for t in regexes)}
             for title, regexes in charts.items() if regexes}
    share = next(t for t in lines if t.startswith("share of each term"))
    assert lines[share] == {"term=contrastive", "term=init", "term=coefficient"}
    assert lines[next(t for t in lines if t.startswith("eval: accuracy after each"))] == {f"test_step={k}" for k in range(4)}
    assert lines[next(t for t in lines if t.startswith("identity"))] == {"check=identity", "check=reconstruction"}
    assert lines[next(t for t in lines if t.startswith("pair weights"))] == {"class=same", "class=different"}
    norms = lines[next(t for t in lines if t.startswith("norm of each term"))]
    assert {"term=total", "term=encoder_adaptation", "term=contrastive"} <= norms


def test_hparams_register_the_swept_keys_first_and_the_final_accuracies(tmp_path):
    naming = Naming("head.policy=random,seed=1", swept=("head.policy", "seed"), trial="random,1",
                    choices=(("ablation", "none"), ("algorithm", "maml"), ("data", "synthetic")))
    train(config("head.policy=random", "seed=1"), tmp_path, show_progress=False, naming=naming)
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["head.policy=random,seed=1"]
    experiment = values(tmp_path, hparams_metadata.EXPERIMENT_TAG)[0][1]
    parsed = hparams_metadata.parse_experiment_plugin_data(experiment.metadata.plugin_data.content)
    infos = list(parsed.hparam_infos)
    assert [(i.name, i.differs) for i in infos[:2]] == [("head.policy", True), ("seed", True)]
    assert not any(i.differs for i in infos[2:])
    assert [i.name for i in infos[2:]] == sorted(set(HPARAM_KEYS) - {"head.policy", "seed"})
    assert [m.name.tag for m in parsed.metric_infos] == list(HPARAM_METRICS)
    start = values(tmp_path, hparams_metadata.SESSION_START_INFO_TAG)[0][1]
    info = hparams_metadata.parse_session_start_info_plugin_data(start.metadata.plugin_data.content)
    assert info.group_name == "random,1" and info.hparams["head.policy"].string_value == "random"


def test_an_ablation_of_only_zero_terms_warns(tmp_path, caplog):
    train(config("algorithm=anil", "algorithm.inner_steps=1", "head.policy=zeroing", "ablation=contrastive_only"),
          tmp_path, show_progress=False)
    assert "ablation=contrastive_only removes only init, coefficient" in caplog.text


def test_the_swept_keys_come_from_the_command_line_and_the_sweeper():
    from bilevel.app.config.naming import sweep_keys

    argv = ["-m", "head.policy=random,zeroing", "train.steps=5", "algorithm=fomaml,maml"]
    assert sweep_keys(argv, {"seed": "0,1", "data.shots": "1"}) == ["head.policy", "algorithm", "seed"]


def test_config_yaml_records_the_commit_the_tree_state_and_the_engine_hash(tmp_path):
    """Recomputed here: ``git`` itself, and SHA-256 over the ``bilevel`` and ``algorithms`` sources
    as docs say (sorted relative paths, ``path NUL content NUL``)."""
    import hashlib

    import yaml

    from bilevel.app.lifecycle.provenance import ENGINE_EPOCH

    train(config("train.steps=2", "train.eval_every=2"), tmp_path, show_progress=False)
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())["provenance"]
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                            check=True).stdout
    digest = hashlib.sha256()
    for package in ("bilevel", "algorithms"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(ROOT / package).as_posix()}".encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    assert record == {"commit": head, "dirty": bool(status.strip()), "engine_sha256": digest.hexdigest(),
                      "engine_epoch": ENGINE_EPOCH}


def test_the_papers_head_init_is_kaiming_normal_with_zero_bias():
    """``head.init=paper``: ``W ~ N(0, 2/d)``, ``b = 0`` (d = 16 features here, 5 × 16 weights: the
    sample sd within 25 % of √(2/16)); ``default`` keeps ``nn.Linear``'s ``U(−1/√d, 1/√d)``."""
    from bilevel.app.setup import setup

    paper = setup(config("head.policy=random", "head.init=paper")).params
    default = setup(config("head.policy=random", "head.init=default")).params
    weight, bias = paper["head.weight"], paper["head.bias"]
    assert weight.shape[-1] == 16 and torch.all(bias == 0)
    assert abs(float(weight.std()) / (2 / 16) ** 0.5 - 1) < 0.25
    assert float(default["head.weight"].abs().max()) <= 1 / 4 and float(default["head.bias"].abs().max()) > 0
    zeroed = setup(config("head.policy=zeroing", "head.init=paper")).params
    assert torch.all(zeroed["head.weight"] == 0)
