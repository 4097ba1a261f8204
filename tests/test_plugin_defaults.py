"""What a plugin declares reaches a run, and a run that is not learning says so.

* ``head.policy`` left unset is the algorithm's own (``BilevelAlgorithm.head_policy``), and the
  run's ``config.yaml`` records the value; a policy on the command line wins.
* :class:`bilevel.app.stalls.StallWatch` warns once about a meta-gradient below round-off and
  about accuracy at chance, and not about a run that learns; a BOIL-like plugin trained under
  ``head.policy=zeroing`` (from which it cannot learn) gets both warnings in ``train.log``.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import bilevel.algorithm as engine
from bilevel import HEAD_WEIGHT, InnerConfig, InnerStep, chain_steps, frozen_head, register
from bilevel.app import stalls
from bilevel.app.config.schema import register_configs, typed_config, validate
from bilevel.app.stalls import StallWatch
from bilevel.app.train import train
from algorithms.maml import MAML

FAST = [
    "data=synthetic", "model=mlp", "model.hidden=16", "data.queries=3", "data.synthetic_dim=8",
    "train.steps=6", "train.meta_batch=2", "train.eval_every=6", "train.log_every=2",
    "train.checkpoint_every=6", "train.decompose_every=3", "train.image_every=0",
    "eval.tasks=4", "eval.final_tasks=4", "device=cpu", "execution=loop",
]


class EncoderOnly(MAML):
    """One SGD step on the encoder, the head frozen (BOIL's inner loop, one step)."""

    head_policy = "random"
    head_frozen = True

    def update_rule(self, inner: InnerConfig) -> InnerStep:
        return chain_steps(frozen_head(), super().update_rule(inner))


@pytest.fixture
def encoder_only(monkeypatch):
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("encoder_only")(EncoderOnly)


def _config(*overrides: str):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=FAST + list(overrides))


def test_head_policy_defaults_to_the_algorithms(encoder_only):
    assert _config().head.policy == "zeroing"
    assert _config("algorithm.name=encoder_only").head.policy == "random"
    assert _config("algorithm.name=encoder_only", "head.policy=zeroing").head.policy == "zeroing"
    cfg = typed_config(_config("algorithm.name=encoder_only"))
    validate(cfg)
    assert OmegaConf.to_container(cfg, resolve=False)["head"]["policy"] == "random"


def test_a_bad_declared_policy_is_refused_by_name(encoder_only, monkeypatch):
    monkeypatch.setattr(EncoderOnly, "head_policy", "zero")
    cfg = typed_config(_config("algorithm.name=encoder_only"))
    with pytest.raises(ValueError, match="head.policy must be one of random, scaled, zero_init, zeroing, got 'zero'"):
        validate(cfg)


def test_stall_watch_warns_once_about_a_meta_gradient_below_round_off():
    watch = StallWatch(ways=5, queries_per_step=60, patience=6)
    params = {"encoder.w": torch.ones(100), HEAD_WEIGHT: torch.ones(5, 4)}
    tiny = {"encoder.w": torch.full((100,), 1e-19), HEAD_WEIGHT: torch.ones(5, 4)}
    learning = torch.tensor(0.6)
    assert watch.check(2, tiny, params, learning, 2) == [] and watch.check(4, tiny, params, learning, 2) == []
    (warning,) = watch.check(6, tiny, params, learning, 2)
    assert "below round-off for 6 steps" in warning and "head.policy=random" in warning
    assert watch.check(8, tiny, params, learning, 2) == []  # said once


def test_stall_watch_counts_steps_in_a_row():
    watch = StallWatch(ways=5, queries_per_step=60, patience=6)
    params = {"encoder.w": torch.ones(100)}
    tiny, real = {"encoder.w": torch.full((100,), 1e-19)}, {"encoder.w": torch.full((100,), 1e-3)}
    for done, grad in [(2, tiny), (4, tiny), (6, real), (8, tiny), (10, tiny)]:
        assert watch.check(done, grad, params, torch.tensor(0.6), 2) == []


def test_stall_watch_warns_about_chance_accuracy_and_not_about_learning():
    params, grad = {"encoder.w": torch.ones(100)}, {"encoder.w": torch.full((100,), 1e-2)}
    watch = StallWatch(ways=5, queries_per_step=60, patience=4)
    assert watch.check(2, grad, params, torch.tensor(0.21), 2) == []
    (warning,) = watch.check(4, grad, params, torch.tensor(0.19), 2)
    assert "at chance for 4 steps" in warning and "chance 1/5 = 0.200" in warning
    learner = StallWatch(ways=5, queries_per_step=60, patience=4)
    assert [learner.check(d, grad, params, torch.tensor(acc), 2) for d, acc in [(2, 0.2), (4, 0.31), (6, 0.2)]] \
        == [[], [], []]


def test_a_run_that_cannot_learn_warns(encoder_only, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(stalls, "PATIENCE", 4)
    with caplog.at_level(logging.WARNING, logger="bilevel.app.attempt"):
        train(_config("algorithm.name=encoder_only", "head.policy=zeroing"), tmp_path, show_progress=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning: after step")]
    assert len(said) == 2
    assert "meta-gradient has been below round-off" in said[0] and "at chance" in said[1]


def test_the_same_run_from_its_own_default_policy_does_not_warn(encoder_only, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(stalls, "PATIENCE", 4)
    with caplog.at_level(logging.WARNING, logger="bilevel.app.attempt"):
        train(_config("algorithm.name=encoder_only"), tmp_path, show_progress=False)
    assert not [r for r in caplog.records if "below round-off" in r.getMessage()]
    assert OmegaConf.load(tmp_path / "config.yaml").head.policy == "random"
