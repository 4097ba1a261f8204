"""The study protocols (``configs/experiment/``): each composes, validates, states its source, sweeps
at least 5 seeds, names its jobs by their swept values (so a rerun resumes them) and trains with at
least 2 inner steps wherever the encoder adapts (the inner_steps study's 1-step arm aside)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bilevel.app.config import register_configs, typed_config, validate

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
