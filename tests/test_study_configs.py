"""The study protocols (``configs/experiment/``): each composes, validates, states its source, sweeps
at least 5 seeds, names its jobs by their swept values (so a rerun resumes them) and trains with at
least 2 inner steps wherever the encoder adapts (the inner_steps study's 1-step arm aside)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bilevel.app.config.schema import register_configs, typed_config, validate
from bilevel.report.runs import format_value
from bilevel.report.study_claims import parse_declared
from bilevel.run_files import flatten

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiment"
STUDIES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


@pytest.mark.parametrize("study", STUDIES)
def test_study_config_is_a_resumable_sweep_of_at_least_five_seeds(study: str) -> None:
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={study}"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}
    assert len(params["seed"]) >= 5
    text = (EXPERIMENTS / f"{study}.yaml").read_text()
    assert "Source:" in text or "Beyond the paper" in text
    assert "subdir: ${hydra.job.override_dirname}" in text
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    run = typed_config(cfg)
    validate(run)
    steps = [int(s) for s in params.get("algorithm.inner_steps", [run.algorithm.inner_steps])]
    if run.algorithm.get("adapt") == "all" and study != "inner_steps":
        assert min(steps) >= 2, f"{study} adapts the encoder with {min(steps)} training inner step(s)"
    assert run.eval.final_tasks >= 600 or study == "cosine_similarity"


def test_memorisation_reaches_the_papers_exposures_per_class() -> None:
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=memorisation"])
    exposures = cfg.train.steps * cfg.train.meta_batch * cfg.data.ways / cfg.data.train_classes
    assert exposures >= 400 and cfg.data.fixed_blocks and cfg.algorithm.order == "first_order"


def _composed(study: str) -> tuple[dict, dict]:
    """The study's flattened config and its swept values ``{key: [values]}``."""
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={study}"], return_hydra_config=True)
    swept = {k: str(v).split(",") for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return OmegaConf.to_container(cfg), swept


@pytest.mark.parametrize("study", STUDIES)
def test_declared_comparisons_name_keys_and_values_the_sweep_has(study: str) -> None:
    """Every declared comparison parses, names config keys that exist, and asks for values the config
    holds or the sweep runs (``head.init=default``: the second random-head arm's own command)."""
    config, swept = _composed(study)
    flat = {k: format_value(v) for k, v in flatten(config).items()}
    random_head = "random" in swept.get("head.policy", [flat["head.policy"]])
    assert flat["head.init"] == "paper" or not random_head, f"{study}: the random-head arm must use head.init=paper"
    for raw in config["study"]["comparisons"]:
        declared = parse_declared(raw)
        specs = [declared.a, declared.b, declared.where]
        if declared.across is not None:
            key, first, second = declared.across
            specs.append({key: first})
            specs.append({key: second})
        for spec in specs:
            for key, value in spec.items():
                assert key in flat, f"{study}: {declared.name!r} names {key}, which the config lacks"
                group = key.removesuffix(".name")  # a swept config group sets its node's name
                allowed = {flat[key], *swept.get(key, []), *swept.get(group, [])} | ({"default"} if key == "head.init" else set())
                assert value in allowed, f"{study}: {declared.name!r} asks {key}={value}, not in {sorted(allowed)}"


def test_the_papers_head_policy_claims_are_declared_with_the_one_shot_numbers() -> None:
    config, _ = _composed("head_policy")
    by_name = {c["name"]: c for c in config["study"]["comparisons"]}
    assert {k: by_name["zeroing vs random head, first order"]["paper"][k] for k in "ab"} == {"a": 0.888, "b": 0.939}
    assert {k: by_name["zeroing vs random head, second order"]["paper"][k] for k in "ab"} == {"a": 0.449, "b": 0.895}
