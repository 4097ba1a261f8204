"""The training app: config validation, head policies, ablation paths, NaN handling, resume."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from bilevel.algorithm import register
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app.config.schema import register_configs
from bilevel.errors import NonFiniteError
from bilevel.run_files import event_files
from bilevel.app.setup import setup
from bilevel.app.train import train
from algorithms.maml import MAML
from bilevel import Want

FAST = [
    "data=synthetic", "model=mlp", "model.hidden=16", "data.queries=3", "data.synthetic_dim=8",
    "train.steps=6", "train.meta_batch=2", "train.eval_every=3", "train.log_every=2",
    "train.checkpoint_every=2", "train.decompose_every=2", "train.image_every=4",
    "eval.tasks=4", "eval.final_tasks=4", "device=cpu", "execution=loop",
]


def config(*overrides: str):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=FAST + list(overrides))


def test_default_config_is_the_documented_default_run():
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train")
    assert cfg.algorithm.name == "maml" and cfg.algorithm.order == "second_order"
    assert cfg.head.policy == "zeroing"
    assert (cfg.data.name, cfg.data.ways, cfg.data.shots) == ("glyphs", 5, 1)


def test_run_directory_holds_config_events_checkpoint_and_metrics(tmp_path):
    metrics = train(config(), tmp_path, show_progress=False)
    assert (tmp_path / "config.yaml").exists()
    assert event_files(tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))
    assert state["step"] == 6
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics and 0.0 <= metrics["test_accuracy"] <= 1.0


def test_typo_in_a_config_key_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="stesp"):
        config("train.stesp=3")


def test_unknown_algorithm_key_fails_naming_it():
    with pytest.raises(ValueError, match="inner_lrr"):
        setup(config("+algorithm.inner_lrr=0.1"))


def test_unknown_algorithm_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown algorithm 'mamll'.*maml"):
        setup(config("algorithm.name=mamll"))


def test_more_ways_than_classes_fails_before_training():
    with pytest.raises(ValueError, match="ways|classes"):
        setup(config("data.ways=500"))


def test_more_shots_and_queries_than_drawings_fails_before_training():
    with pytest.raises(ValueError, match="shots|queries|samples"):
        setup(config("data.shots=30", "data.queries=30"))


def test_missing_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="images_background|layout|not found|missing|exist"):
        setup(config("data=omniglot", f"data.root={tmp_path / 'nowhere'}", "model=conv4"))


def test_cpu_conv_picks_the_convolution_kernels_and_refuses_others():
    setup(config("cpu_conv=native"))
    assert not torch.backends.mkldnn.enabled
    setup(config())
    assert torch.backends.mkldnn.enabled
    with pytest.raises(ValueError, match="cpu_conv.*onednn.*native"):
        setup(config("cpu_conv=mkl"))


def test_dropping_a_term_the_algorithm_lacks_says_so():
    with pytest.raises(ValueError, match="no term"):
        setup(config("ablation.drop=[noise]"))


class _Spy(MAML):
    """MAML that records the head it starts every inner loop from."""

    seen: list = []
    nan_after: int | None = None

    def meta_step(self, params, batch, want=Want()):
        type(self).seen.append((params["head.weight"].clone(), params["head.bias"].clone()))
        step = super().meta_step(params, batch, want)
        if self.nan_after is not None and len(type(self).seen) > self.nan_after:
            step.loss = step.loss * float("nan")
        return step


register("spy_maml")(_Spy)


def test_zeroing_trick_zeroes_the_head_before_every_inner_loop(tmp_path):
    _Spy.seen, _Spy.nan_after = [], None
    train(config("algorithm.name=spy_maml", "head.policy=zeroing"), tmp_path, show_progress=False)
    assert len(_Spy.seen) == 6
    assert all(torch.count_nonzero(w) == 0 and torch.count_nonzero(b) == 0 for w, b in _Spy.seen)
    final = load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))["params"]
    assert torch.count_nonzero(final["head.weight"]) > 0  # the outer optimiser still updates the head


def test_random_head_is_not_zeroed(tmp_path):
    _Spy.seen, _Spy.nan_after = [], None
    train(config("algorithm.name=spy_maml", "head.policy=random", "train.steps=2"), tmp_path, show_progress=False)
    assert torch.count_nonzero(_Spy.seen[0][0]) > 0


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    _Spy.seen, _Spy.nan_after = [], 5  # steps 1..4 fine (checkpoint at 2 and 4), NaN from the 6th call
    with pytest.raises(NonFiniteError, match="last good checkpoint.*step 4"):
        train(config("algorithm.name=spy_maml", "train.steps=8", "execution=loop"), tmp_path, show_progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in state["params"].values())


def _final_params(tmp_path: Path, *overrides: str) -> dict:
    train(config(*overrides), tmp_path, show_progress=False)
    return load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))["params"]


def test_ablation_none_is_bit_identical_with_and_without_decomposition(tmp_path):
    a = _final_params(tmp_path / "a", "train.decompose_every=1")
    b = _final_params(tmp_path / "b", "train.decompose_every=0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_contrastive_only_at_zero_head_reproduces_one_step_head_only_maml(tmp_path):
    common = ("algorithm=anil", "algorithm.inner_steps=1", "head.policy=zeroing", "dtype=float64")
    plain = _final_params(tmp_path / "plain", *common)
    contrastive = _final_params(tmp_path / "contrastive", *common, "ablation=contrastive_only")
    for k in plain:
        torch.testing.assert_close(contrastive[k], plain[k], rtol=1e-9, atol=1e-12)


def test_contrastive_only_differs_from_maml_with_a_random_head(tmp_path):
    common = ("algorithm=anil", "head.policy=random", "dtype=float64")
    plain = _final_params(tmp_path / "plain", *common)
    contrastive = _final_params(tmp_path / "contrastive", *common, "ablation=contrastive_only")
    assert max(float((plain[k] - contrastive[k]).abs().max()) for k in plain) > 1e-6


def test_one_sided_ablation_splits_the_contrastive_term(tmp_path):
    run = setup(config("ablation=one_sided"))
    assert "contrastive_support" in run.ablation.terms and run.ablation.kept[0] == "contrastive_query"


def test_resume_continues_the_same_run(tmp_path):
    straight = _final_params(tmp_path / "straight", "train.steps=4")
    train(config("train.steps=2"), tmp_path / "resumed", show_progress=False)
    resumed = _final_params(tmp_path / "resumed", "train.steps=4", "train.resume=force")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_execution_auto_picks_an_available_path(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train(config("execution=auto", "algorithm=anil", "train.steps=2"), tmp_path, show_progress=False)
    assert "tasks run " in caplog.text and "(execution=" in caplog.text
