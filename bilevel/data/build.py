"""Builds data sets and task samplers from a :class:`DataConfig`."""
from __future__ import annotations

from bilevel.data.config import DataConfig
from bilevel.data.dataset import ClassDataset, check_split
from bilevel.data.glyphs import glyph_dataset
from bilevel.data.miniimagenet import SIDE, MiniImageNetDataset
from bilevel.data.omniglot import OmniglotDataset
from bilevel.data.sampler import ClassRule, TaskSampler
from bilevel.data.subset import ClassSubset, choose_classes
from bilevel.data.synthetic import SyntheticDataset, SyntheticImages

DATASETS = ("glyphs", "synthetic", "omniglot", "miniimagenet")


def _check_name(cfg: DataConfig) -> None:
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {cfg.name!r}; set data.name to one of {', '.join(DATASETS)}")


def _root(cfg: DataConfig) -> str:
    if cfg.root is None:
        raise ValueError(f"data.root is required for {cfg.name}: set it to the directory that holds the data set")
    return cfg.root


def build_dataset(cfg: DataConfig, split: str) -> ClassDataset:
    """The ``split`` ('train', 'val' or 'test') of the data set named by ``cfg.name``; the train
    split reduced to ``cfg.train_classes`` classes when that is set (:mod:`bilevel.data.subset`)."""
    dataset = _full_dataset(cfg, split)
    if split == "train" and cfg.train_classes is not None:
        if cfg.train_classes < cfg.ways:
            raise ValueError(f"data.train_classes={cfg.train_classes} is fewer than the {cfg.ways} classes a "
                             f"{cfg.ways}-way task needs; set data.train_classes >= data.ways")
        return ClassSubset(dataset, choose_classes(dataset.num_classes, cfg.train_classes, cfg.seed))
    return dataset


def _full_dataset(cfg: DataConfig, split: str) -> ClassDataset:
    _check_name(cfg)
    check_split(split)
    if cfg.name == "glyphs":
        return glyph_dataset(split, seed=cfg.seed, image_size=cfg.image_size, cache_dir=cfg.root)
    if cfg.name == "synthetic" and cfg.synthetic_channels:
        return SyntheticImages(split, cfg.synthetic_classes, input_shape(cfg), cfg.synthetic_noise, cfg.seed)
    if cfg.name == "synthetic":
        return SyntheticDataset(split, cfg.synthetic_classes, cfg.synthetic_dim, cfg.synthetic_noise, cfg.seed)
    if cfg.name == "omniglot":
        return OmniglotDataset(_root(cfg), split, image_size=cfg.image_size, rotations=cfg.rotations)
    return MiniImageNetDataset(_root(cfg), split)


def build_sampler(cfg: DataConfig, split: str, meta_batch: int, seed: int) -> TaskSampler:
    """A :class:`TaskSampler` over ``build_dataset(cfg, split)`` with the task shape of ``cfg``
    (``fixed_blocks`` shapes training tasks only: evaluation tasks stay random draws)."""
    dataset = build_dataset(cfg, split)
    try:
        rule = ClassRule(fixed_labels=cfg.fixed_labels, fixed_blocks=cfg.fixed_blocks and split == "train")
        return TaskSampler(dataset, cfg.ways, cfg.shots, cfg.queries, meta_batch, seed, rule)
    except ValueError as error:
        raise ValueError(f"the {split!r} split of {cfg.name}: {error}") from None


def input_shape(cfg: DataConfig) -> tuple[int, ...]:
    """Shape of one input of the configured data set, without building it."""
    _check_name(cfg)
    if cfg.name == "synthetic" and cfg.synthetic_channels:
        return (cfg.synthetic_channels, cfg.image_size, cfg.image_size)
    if cfg.name == "synthetic":
        return (cfg.synthetic_dim,)
    if cfg.name == "miniimagenet":
        return (3, SIDE, SIDE)
    return (1, cfg.image_size, cfg.image_size)
