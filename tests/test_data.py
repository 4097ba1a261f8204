"""Tests of the task sampler, TaskBatch, the builders and the glyphs and synthetic data sets."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.data import (
    ClassRule,
    DataConfig,
    TaskBatch,
    TaskSampler,
    build_dataset,
    build_sampler,
    input_shape,
)
from bilevel.data.glyph_render import font_files, render_canonical
from bilevel.data.glyphs import _draw, build_glyphs, cache_file, load_glyphs, split_alphabets
from bilevel.data.synthetic import SyntheticDataset


@pytest.fixture(scope="session")
def glyph_cfg(tmp_path_factory) -> DataConfig:
    """Glyphs cached in a fresh session directory (built once, ~15 s)."""
    return DataConfig(name="glyphs", root=str(tmp_path_factory.mktemp("glyph_cache")))


@pytest.fixture(scope="session")
def glyph_splits(glyph_cfg):
    return {split: build_dataset(glyph_cfg, split) for split in ("train", "val", "test")}


def synthetic(split="train", classes=64, **kwargs) -> SyntheticDataset:
    return SyntheticDataset(split, num_classes=classes, **kwargs)


def batches(sampler: TaskSampler, n: int) -> list[TaskBatch]:
    return [sampler.sample() for _ in range(n)]


def same(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y", "classes"))


# --- glyphs ---------------------------------------------------------------------------------------------


def test_glyphs_meet_size_requirement_and_splits_are_disjoint(glyph_splits):
    sizes = {split: ds.num_classes for split, ds in glyph_splits.items()}
    alphabets = {split: set(ds.alphabets) for split, ds in glyph_splits.items()}
    assert sum(sizes.values()) >= 1000
    assert len(set().union(*alphabets.values())) >= 15
    assert not alphabets["train"] & alphabets["val"]
    assert not alphabets["train"] & alphabets["test"]
    assert not alphabets["val"] & alphabets["test"]
    assert min(len(a) for a in alphabets.values()) >= 2
    evaluation = sizes["val"] + sizes["test"]
    assert 0.15 * sum(sizes.values()) <= evaluation <= 0.3 * sum(sizes.values())
    characters = [info.character for ds in glyph_splits.values() for info in ds.info]
    assert len(characters) == len(set(characters))


def test_glyph_images_are_white_ink_on_black(glyph_splits):
    ds = glyph_splits["train"]
    assert ds.image_shape == (1, 28, 28) and ds.samples_per_class == 20
    images = ds.gather(torch.arange(50), torch.arange(50) % 20)
    assert images.dtype == torch.float32 and images.shape == (50, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    border = torch.cat([images[..., 0, :], images[..., -1, :]], dim=-1)
    assert border.mean() < 0.05 < images.mean() < 0.5
    assert (images.amax(dim=(1, 2, 3)) > 0.9).all()


def test_glyph_cache_is_written_and_reloaded(glyph_cfg, glyph_splits):
    path = cache_file(Path(glyph_cfg.root), glyph_cfg.seed, glyph_cfg.image_size)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    cached, infos = load_glyphs.__wrapped__(path.parent, glyph_cfg.seed, glyph_cfg.image_size)  # from disk
    fresh, fresh_infos = load_glyphs(path.parent, glyph_cfg.seed, glyph_cfg.image_size)
    assert torch.equal(cached, fresh) and infos == fresh_infos
    assert split_alphabets(infos)["train"] == list(glyph_splits["train"].alphabets)


@pytest.mark.slow
def test_full_glyph_build_is_deterministic(glyph_cfg):
    images, infos = build_glyphs(seed=0, image_size=28)
    cached, cached_infos = load_glyphs(Path(glyph_cfg.root), 0, 28)
    assert torch.equal(images, cached) and tuple(infos) == cached_infos
    scripts = Counter(info.alphabet for info in infos)
    print(f"glyphs: {len(infos)} classes in {len(scripts)} alphabets: {dict(scripts.most_common())}")
    assert len(infos) >= 1000 and len(scripts) >= 15


def test_glyph_drawings_depend_on_the_seed():
    fonts = font_files()[:2]
    renders = [np.stack([render_canonical(char, font)[0] for font in fonts]) for char in "AbQ"]
    assert torch.equal(_draw(renders, 0, 28), _draw(renders, 0, 28))
    assert not torch.equal(_draw(renders, 0, 28), _draw(renders, 1, 28))


# --- sampler and TaskBatch -------------------------------------------------------------------------------


def test_task_batch_shapes_and_dtypes(glyph_cfg):
    batch = build_sampler(glyph_cfg, "val", meta_batch=3, seed=0).sample()
    assert batch.num_tasks == 3 and batch.ways == 5
    assert batch.support_x.shape == (3, 5, 1, 28, 28) and batch.query_x.shape == (3, 75, 1, 28, 28)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_y.dtype == batch.query_y.dtype == batch.classes.dtype == torch.int64
    assert batch.classes.shape == (3, 5)
    assert torch.equal(batch.support_y[0], torch.arange(5))
    assert torch.equal(batch.query_y[1], torch.arange(5).repeat_interleave(15))
    wide = batch.to(dtype=torch.float64)
    assert wide.support_x.dtype == wide.query_x.dtype == torch.float64
    assert wide.support_y.dtype == wide.classes.dtype == torch.int64
    assert torch.equal(wide.query_x.float(), batch.query_x)
    one = batch.task(1)
    assert one.num_tasks == 1 and one.support_x.shape == (1, 5, 1, 28, 28)
    assert torch.equal(one.classes[0], batch.classes[1]) and torch.equal(one.query_x[0], batch.query_x[1])
    assert torch.equal(batch.task(-1).classes, batch.classes[2:])
    with pytest.raises(IndexError, match="out of range"):
        batch.task(3)


def test_samples_come_from_the_labelled_class_in_class_order():
    ds = synthetic(dim=4)
    sampler = TaskSampler(ds, ways=3, shots=2, queries=4, meta_batch=5, seed=0)
    batch = sampler.sample()
    for t in range(5):
        assert len(set(batch.classes[t].tolist())) == 3
        for x, y, per_class in ((batch.support_x, batch.support_y, 2), (batch.query_x, batch.query_y, 4)):
            for row, label in zip(x[t], y[t]):
                pool = ds.samples[batch.classes[t, label]]
                assert (pool == row).all(dim=1).any()
            drawn = torch.cat([batch.support_x[t].view(3, 2, 4), batch.query_x[t].view(3, 4, 4)], dim=1)
            assert all(len(torch.unique(d, dim=0)) == 6 for d in drawn)  # distinct drawings per class


def test_same_seed_same_sequence_different_seed_differs():
    ds = synthetic()
    a = batches(TaskSampler(ds, 5, 1, 5, 4, seed=7), 3)
    b = batches(TaskSampler(ds, 5, 1, 5, 4, seed=7), 3)
    c = batches(TaskSampler(ds, 5, 1, 5, 4, seed=8), 3)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not any(same(x, y) for x, y in zip(a, c))


def test_state_dict_round_trip_resumes_the_sequence(glyph_cfg):
    """The state is the position (the seed is the run's config, checked by the resume contract)."""
    first = build_sampler(glyph_cfg, "train", meta_batch=2, seed=3)
    batches(first, 2)
    state = first.state_dict()
    assert state == {"step": 2}
    expected = batches(first, 3)
    resumed = build_sampler(glyph_cfg, "train", meta_batch=2, seed=3)
    resumed.load_state_dict(state)
    assert all(same(x, y) for x, y in zip(expected, batches(resumed, 3)))
    with pytest.raises(ValueError, match="expected 'step'"):
        resumed.load_state_dict({})


def test_iteration_is_infinite_and_matches_sample():
    ds = synthetic()
    it = iter(TaskSampler(ds, 5, 1, 1, 2, seed=0))
    ref = TaskSampler(ds, 5, 1, 1, 2, seed=0)
    assert all(same(next(it), ref.sample()) for _ in range(5))


def test_labels_are_a_fresh_permutation_per_task():
    sampler = TaskSampler(synthetic(classes=10), ways=5, shots=1, queries=1, meta_batch=50, seed=0)
    classes = torch.cat([sampler.sample().classes for _ in range(8)])  # 400 tasks
    label_of = Counter((c, j) for row in classes.tolist() for j, c in enumerate(row))
    for c in range(10):  # every class gets every label
        assert all(label_of[(c, j)] > 0 for j in range(5))
    assert len(set(classes[:, 0].tolist())) == 10  # label 0 goes to varying classes
    sorted_rows = (classes[:, 1:] > classes[:, :-1]).all(dim=1)
    assert sorted_rows.float().mean() < 0.1  # not a fixed order


def test_fixed_labels_keep_one_label_per_class():
    sampler = TaskSampler(synthetic(classes=23), ways=5, shots=1, queries=2, meta_batch=40, seed=0, rule=ClassRule(fixed_labels=True))
    classes = torch.cat([sampler.sample().classes for _ in range(5)])
    assert torch.equal(classes % 5, torch.arange(5).expand_as(classes))
    assert len(torch.unique(classes)) == 23  # every class is used (the last residues have 4 classes)
    assert classes.max() < 23


def test_build_sampler_errors_name_the_split():
    cfg = DataConfig(name="synthetic", ways=9, synthetic_classes=8)
    with pytest.raises(ValueError, match="the 'val' split of synthetic: 9-way tasks need at least 9 classes, the split has 8"):
        build_sampler(cfg, "val", meta_batch=1, seed=0)


def test_build_sampler_fixed_labels_from_config():
    cfg = DataConfig(name="synthetic", ways=4, fixed_labels=True, queries=3)
    classes = build_sampler(cfg, "test", meta_batch=6, seed=1).sample().classes
    assert torch.equal(classes % 4, torch.arange(4).expand(6, 4))


# --- errors ----------------------------------------------------------------------------------------------


def test_too_many_ways_names_the_numbers():
    with pytest.raises(ValueError, match=r"5-way tasks need at least 5 classes, the split has 3"):
        TaskSampler(synthetic(classes=3), ways=5, shots=1, queries=1, meta_batch=1, seed=0)
    with pytest.raises(ValueError, match="fixed_labels"):
        TaskSampler(synthetic(classes=3), ways=5, shots=1, queries=1, meta_batch=1, seed=0, rule=ClassRule(fixed_labels=True))


def test_too_many_shots_and_queries():
    with pytest.raises(ValueError, match=r"5 \+ 36 = 41 exceeds the 40 samples"):
        TaskSampler(synthetic(), ways=5, shots=5, queries=36, meta_batch=1, seed=0)


@pytest.mark.parametrize("field", ["ways", "shots", "queries", "meta_batch"])
def test_non_positive_task_sizes(field):
    sizes = dict(ways=5, shots=1, queries=1, meta_batch=1) | {field: 0}
    with pytest.raises(ValueError, match=f"{field} must be at least 1, got 0"):
        TaskSampler(synthetic(), seed=0, **sizes)


def test_unknown_name_and_split_list_the_valid_ones():
    with pytest.raises(ValueError, match="glyphs, synthetic, omniglot, miniimagenet"):
        build_dataset(DataConfig(name="cifar"), "train")
    with pytest.raises(ValueError, match="glyphs, synthetic, omniglot, miniimagenet"):
        input_shape(DataConfig(name="cifar"))
    with pytest.raises(ValueError, match="train, val, test"):
        build_dataset(DataConfig(name="synthetic"), "validation")


@pytest.mark.parametrize("name", ["omniglot", "miniimagenet"])
def test_directory_data_sets_need_a_root(name):
    with pytest.raises(ValueError, match="data.root is required"):
        build_dataset(DataConfig(name=name), "train")


# --- synthetic and shapes --------------------------------------------------------------------------------


def test_synthetic_splits_are_disjoint_and_deterministic():
    train, val, test = (synthetic(s, classes=8, dim=6, seed=2) for s in ("train", "val", "test"))
    means = torch.cat([train.means, val.means, test.means])
    assert len(torch.unique(means, dim=0)) == 24
    assert torch.allclose(means.norm(dim=1), torch.ones(24))
    assert torch.equal(train.samples, synthetic("train", classes=8, dim=6, seed=2).samples)
    assert not torch.equal(train.samples, synthetic("train", classes=8, dim=6, seed=3).samples)
    assert train.gather(torch.tensor([1, 2]), torch.tensor([0, 39])).shape == (2, 6)


def test_synthetic_images_are_fixed_per_sample_distinct_per_class_and_split():
    cfg = DataConfig(name="synthetic", synthetic_channels=3, image_size=20, synthetic_classes=6, synthetic_noise=0.5)
    train, again, val = build_dataset(cfg, "train"), build_dataset(cfg, "train"), build_dataset(cfg, "val")
    classes, indices = torch.tensor([4, 1, 4, 1, 0]), torch.tensor([3, 0, 7, 39, 3])
    images = train.gather(classes, indices)
    assert images.shape == (5, 3, 20, 20) and images.dtype == torch.float32
    assert torch.equal(images, again.gather(classes.flip(0), indices.flip(0)).flip(0))  # per sample, any order
    assert torch.equal(images[0], train.gather(torch.tensor([4]), torch.tensor([3]))[0])
    assert not torch.equal(images[4], val.gather(torch.tensor([0]), torch.tensor([3]))[0])
    pool = train.class_samples(4)
    # per-pixel N(0, 1) means and noise 0.5: the within-class spread is the noise, the class means differ
    assert abs(float(pool.std(0).mean()) - 0.5) < 0.02
    assert float((pool.mean(0) - train.class_samples(1).mean(0)).std()) > 1.2
    other_seed = build_dataset(DataConfig(**{**cfg.__dict__, "seed": 1}), "train")
    assert not torch.equal(images[0], other_seed.gather(torch.tensor([4]), torch.tensor([3]))[0])


def test_synthetic_images_sample_tasks_for_a_conv_model():
    cfg = DataConfig(name="synthetic", synthetic_channels=3, image_size=84, synthetic_classes=8, queries=2)
    batch = build_sampler(cfg, "train", meta_batch=2, seed=0).sample()
    assert input_shape(cfg) == build_dataset(cfg, "test").image_shape == (3, 84, 84)
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.query_x.shape == (2, 10, 3, 84, 84)


def test_input_shape_matches_built_data(glyph_cfg):
    assert input_shape(glyph_cfg) == build_dataset(glyph_cfg, "train").image_shape == (1, 28, 28)
    cfg = DataConfig(name="synthetic", synthetic_dim=7)
    assert input_shape(cfg) == build_dataset(cfg, "val").image_shape == (7,)
    assert input_shape(DataConfig(name="omniglot", image_size=32)) == (1, 32, 32)
    assert input_shape(DataConfig(name="miniimagenet", image_size=32)) == (3, 84, 84)
