"""Few-shot task data: class pools (glyphs, synthetic, Omniglot, mini-ImageNet) and the task sampler."""
from .batch import TaskBatch
from .build import DATASETS, build_dataset, build_sampler, input_shape
from .config import DataConfig
from .dataset import SPLITS, ClassDataset
from .glyphs import GlyphDataset, GlyphInfo
from .miniimagenet import MiniImageNetDataset
from .omniglot import OmniglotDataset
from .sampler import TaskSampler
from .synthetic import SyntheticDataset

__all__ = [
    "TaskBatch", "ClassDataset", "TaskSampler", "DataConfig", "build_dataset", "build_sampler", "input_shape",
    "DATASETS", "SPLITS", "GlyphDataset", "GlyphInfo", "SyntheticDataset", "OmniglotDataset", "MiniImageNetDataset",
]
