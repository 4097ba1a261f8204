"""``data.train_classes`` (a fixed reduced class pool) and ``data.fixed_blocks`` (the memorisation tasks)."""
from __future__ import annotations

import pytest
import torch

from bilevel.data import ClassRule, DataConfig, TaskSampler, build_dataset, build_sampler
from bilevel.data.subset import ClassSubset, choose_classes
from bilevel.data.synthetic import SyntheticDataset


def test_choose_classes_is_a_fixed_sorted_subset_of_the_data_seed() -> None:
    a, b, c = choose_classes(30, 10, 0), choose_classes(30, 10, 0), choose_classes(30, 10, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10 and 0 <= a.min() and a.max() < 30


def test_subset_gathers_the_underlying_classes() -> None:
    full = SyntheticDataset("train", num_classes=12, dim=3)
    subset = ClassSubset(full, torch.tensor([2, 7, 11]))
    got = subset.gather(torch.tensor([0, 2, 1]), torch.tensor([5, 0, 3]))
    assert torch.equal(got, torch.stack([full.samples[2, 5], full.samples[11, 0], full.samples[7, 3]]))
    assert (subset.num_classes, subset.samples_per_class) == (3, full.samples_per_class)


def test_train_classes_reduces_the_train_split_only() -> None:
    cfg = DataConfig(name="synthetic", synthetic_classes=20, train_classes=10)
    assert build_dataset(cfg, "train").num_classes == 10 and build_dataset(cfg, "val").num_classes == 20
    sampler = build_sampler(cfg, "train", 50, seed=0)
    drawn = sampler.sample().classes
    assert int(drawn.max()) < 10


@pytest.mark.parametrize("keep, match", [(21, "between 1 and the 20 classes"), (3, "fewer than the 5 classes")])
def test_bad_train_classes_are_clear_errors(keep: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_dataset(DataConfig(name="synthetic", synthetic_classes=20, train_classes=keep), "train")


def test_fixed_blocks_with_fixed_labels_draw_whole_blocks_in_label_order() -> None:
    sampler = TaskSampler(SyntheticDataset("train", num_classes=17), 5, 1, 1, 60, seed=3,
                          rule=ClassRule(fixed_labels=True, fixed_blocks=True))
    classes = sampler.sample().classes
    blocks = classes // 5
    assert torch.all(blocks == blocks[:, :1]) and int(classes.max()) < 15  # 3 whole blocks of 17 classes
    assert torch.equal(classes % 5, torch.arange(5).expand_as(classes))  # class c has label c % ways
    assert len(set(blocks[:, 0].tolist())) == 3


def test_fixed_blocks_without_fixed_labels_permute_labels_within_the_block() -> None:
    sampler = TaskSampler(SyntheticDataset("train", num_classes=10), 5, 1, 1, 40, seed=0, rule=ClassRule(fixed_blocks=True))
    classes = sampler.sample().classes
    assert torch.all(classes // 5 == (classes // 5)[:, :1])
    assert all(sorted(row.tolist()) == list(range(5 * (row[0] // 5), 5 * (row[0] // 5) + 5)) for row in classes)
    assert not torch.all(classes % 5 == torch.arange(5))  # some task permutes its labels


def test_fixed_blocks_shape_training_tasks_only_and_survive_share_and_fork() -> None:
    cfg = DataConfig(name="synthetic", synthetic_classes=20, fixed_blocks=True, fixed_labels=True)
    train = build_sampler(cfg, "train", 4, seed=0)
    assert train.rule.fixed_blocks and not build_sampler(cfg, "val", 4, seed=0).rule.fixed_blocks
    assert train.share(range(1, 3)).rule.fixed_blocks and train.fork(5).rule.fixed_blocks
    whole = train.draw(0, range(4)).classes
    assert torch.equal(train.share(range(1, 3)).draw(0, range(1, 3)).classes, whole[1:3])
