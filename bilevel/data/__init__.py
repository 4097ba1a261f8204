"""Few-shot task data: class pools (glyphs, synthetic, Omniglot, mini-ImageNet) and the task sampler."""
from bilevel.data.batch import TaskBatch
from bilevel.data.build import DATASETS, build_dataset, build_sampler, input_shape
from bilevel.data.config import DataConfig
from bilevel.data.dataset import SPLITS, ClassDataset
from bilevel.data.glyphs import GlyphDataset, GlyphInfo
from bilevel.data.miniimagenet import MiniImageNetDataset
from bilevel.data.omniglot import OmniglotDataset
from bilevel.data.sampler import ClassRule, TaskSampler
from bilevel.data.synthetic import SyntheticDataset, SyntheticImages

__all__ = [
    "TaskBatch", "ClassDataset", "TaskSampler", "ClassRule", "DataConfig", "build_dataset", "build_sampler", "input_shape",
    "DATASETS", "SPLITS", "GlyphDataset", "GlyphInfo", "SyntheticDataset", "SyntheticImages", "OmniglotDataset", "MiniImageNetDataset",
]
