"""The paper's cosine probe: class-pair means against explicit loops, the file a run writes, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from bilevel.app.config.schema import register_configs
from bilevel.app.cosine_protocol import class_pair_means, heat_maps
from bilevel.app.train import train
from bilevel.run_files import PROBE_FILE

FAST = [
    "data=synthetic", "model=mlp", "model.hidden=16", "data.queries=3", "data.synthetic_dim=8",
    "train.meta_batch=2", "train.eval_every=3", "train.log_every=2", "train.checkpoint_every=2",
    "train.decompose_every=0", "train.image_every=0", "eval.tasks=4", "eval.final_tasks=4", "device=cpu",
    "execution=loop", "cosine.steps=[0,1,3]", "cosine.shots=4", "cosine.queries=4",
]


def config(*overrides: str):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=FAST + list(overrides))


def loop_means(sims: np.ndarray, rows: np.ndarray, cols: np.ndarray, ways: int, exclude_self: bool) -> np.ndarray:
    out = np.zeros((ways, ways))
    for i in range(ways):
        for j in range(ways):
            vals = [sims[a, b] for a in range(len(rows)) for b in range(len(cols))
                    if rows[a] == i and cols[b] == j and not (exclude_self and a == b)]
            out[i, j] = np.mean(vals)
    return out


def test_heat_maps_are_the_class_pair_means_of_unit_feature_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(9, 7, generator=g, dtype=torch.float64)
    sy, qy = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    maps = heat_maps(support, query, sy, qy, 3)
    zs = support.numpy() / np.linalg.norm(support.numpy(), axis=1, keepdims=True)
    zq = query.numpy() / np.linalg.norm(query.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(maps["query_support"].numpy(), loop_means(zq @ zs.T, qy.numpy(), sy.numpy(), 3, False))
    np.testing.assert_allclose(maps["query_query"].numpy(), loop_means(zq @ zq.T, qy.numpy(), qy.numpy(), 3, True))
    assert maps["query_query"].max() < 1.0  # self-pairs (cosine 1) are excluded


def test_class_pair_means_of_constant_blocks() -> None:
    labels = torch.tensor([0, 1, 1])
    sims = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.6], [0.2, 0.6, 1.0]])
    got = class_pair_means(sims, labels, labels, 2, exclude_self=True).numpy()
    np.testing.assert_allclose(got, [[np.nan, 0.2], [0.2, 0.6]])  # class 0's one query has no other


def test_a_run_records_the_probe_steps_and_a_resumed_run_keeps_them(tmp_path) -> None:
    train(config("train.steps=2"), tmp_path, show_progress=False)
    saved = json.loads((tmp_path / PROBE_FILE).read_text())
    assert saved["protocol"]["shots"] == 4 and sorted(saved["steps"], key=int) == ["0", "1"]
    first = saved["steps"]["1"]
    train(config("train.steps=4", "train.resume=force"), tmp_path, show_progress=False)
    resumed = json.loads((tmp_path / PROBE_FILE).read_text())
    assert sorted(resumed["steps"], key=int) == ["0", "1", "3"] and resumed["steps"]["1"] == first
    qs = np.array(resumed["steps"]["3"]["query_support"])
    assert qs.shape == (5, 5) and np.all(np.abs(qs) <= 1 + 1e-9)


def test_the_probe_is_the_same_with_and_without_an_off_probe(tmp_path) -> None:
    """The probe draws its task from its own generator: training is unchanged by it."""
    a = train(config("train.steps=3"), tmp_path / "a", show_progress=False)
    b = train(config("train.steps=3", "cosine.steps=[]"), tmp_path / "b", show_progress=False)
    assert a["test_accuracy"] == b["test_accuracy"] and not (tmp_path / "b" / PROBE_FILE).exists()


def test_a_probe_task_larger_than_a_class_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(Exception, match="cosine"):
        train(config("train.steps=1", "cosine.shots=30", "cosine.queries=30"), tmp_path, show_progress=False)
