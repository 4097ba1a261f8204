"""Tests of the Omniglot and mini-ImageNet loaders on tiny generated directory trees."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.data import DataConfig, MiniImageNetDataset, OmniglotDataset, build_dataset, build_sampler
from bilevel.data.miniimagenet import MEAN, STD

BACKGROUND = {"Alpha": 2, "Beta": 3}
EVALUATION = {"Gamma": 2, "Delta": 1, "Epsilon": 2, "Zeta": 1}
DRAWINGS = 4


def omniglot_png(path: Path, seed: int) -> None:
    """A 105x105 binary PNG: black ink (an off-centre bar) on white, like the original data."""
    rng = np.random.default_rng(seed)
    pixels = np.ones((105, 105), dtype=bool)
    top, left = rng.integers(5, 50, size=2)
    pixels[top : top + 40, left : left + 12] = False
    Image.fromarray(pixels).save(path)


@pytest.fixture
def omniglot_root(tmp_path) -> Path:
    seed = 0
    for folder, alphabets in (("images_background", BACKGROUND), ("images_evaluation", EVALUATION)):
        for alphabet, characters in alphabets.items():
            for c in range(characters):
                character = tmp_path / folder / alphabet / f"character{c + 1:02d}"
                character.mkdir(parents=True)
                for d in range(DRAWINGS):
                    omniglot_png(character / f"{seed:04d}_{d + 1:02d}.png", seed)
                    seed += 1
    return tmp_path


def test_omniglot_splits_and_ink(omniglot_root):
    train = OmniglotDataset(str(omniglot_root), "train")
    val = OmniglotDataset(str(omniglot_root), "val")
    test = OmniglotDataset(str(omniglot_root), "test")
    assert train.alphabets == ("Alpha", "Beta") and train.num_classes == 5
    assert val.alphabets == ("Delta", "Gamma") and test.alphabets == ("Epsilon", "Zeta")
    assert val.num_classes == 3 and test.num_classes == 3
    assert train.samples_per_class == DRAWINGS and train.image_shape == (1, 28, 28)
    images = train.gather(torch.tensor([0, 4]), torch.tensor([0, 3]))
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    assert images.max() > 0.99 and abs(images.mean() - 40 * 12 / 105**2) < 0.005  # inverted: the bar is 1 on 0
    assert images[0, 0, 0, 0] == 0


def test_omniglot_rotations_add_rotated_classes(omniglot_root):
    plain = OmniglotDataset(str(omniglot_root), "train", image_size=20)
    rotated = OmniglotDataset(str(omniglot_root), "train", image_size=20, rotations=True)
    assert rotated.num_classes == 4 * plain.num_classes and rotated.image_shape == (1, 20, 20)
    n = plain.num_classes
    base = plain.gather(torch.tensor([2, 2, 2, 2]), torch.tensor([1, 1, 1, 1]))
    turned = rotated.gather(torch.tensor([2, 2 + n, 2 + 2 * n, 2 + 3 * n]), torch.tensor([1, 1, 1, 1]))
    for k in range(4):
        assert torch.equal(turned[k], torch.rot90(base[k], k, dims=(1, 2)))


def test_omniglot_sampler_from_config(omniglot_root):
    cfg = DataConfig(name="omniglot", root=str(omniglot_root), ways=3, shots=1, queries=2, rotations=True)
    batch = build_sampler(cfg, "val", meta_batch=2, seed=0).sample()
    assert batch.support_x.shape == (2, 3, 1, 28, 28) and batch.classes.max() < 12


def test_omniglot_missing_directories_show_the_layout(tmp_path, omniglot_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*images_background/<alphabet>/<character>/<drawing>.png"):
        OmniglotDataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)no images_evaluation directory in .*bare.*images_evaluation/<alphabet>"):
        build_dataset(DataConfig(name="omniglot", root=str(tmp_path / "bare")), "test")
    (omniglot_root / "images_background" / "Alpha" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.png drawings in .*empty"):
        OmniglotDataset(str(omniglot_root), "train", image_size=27)


def test_omniglot_needs_two_evaluation_alphabets(tmp_path):
    character = tmp_path / "images_evaluation" / "Only" / "character01"
    character.mkdir(parents=True)
    omniglot_png(character / "a.png", 0)
    with pytest.raises(ValueError, match="has 1 alphabet, but val and test need at least 2"):
        OmniglotDataset(str(tmp_path), "val")


COLOURS = {"n01": [(255, 0, 0), (0, 255, 0), (10, 20, 30)], "n02": [(0, 0, 255), (128, 128, 128), (255, 255, 255)]}


@pytest.fixture
def mini_root(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for split, labels in (("train", COLOURS), ("val", {"n03": COLOURS["n01"]}), ("test", {"n04": COLOURS["n02"]})):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for label, colours in labels.items():
                for i, colour in enumerate(colours):
                    # PNGs are lossless (exact normalisation check); one JPEG of another size is resized.
                    name = f"{label}{i:04d}.jpg" if i == 2 else f"{label}{i:04d}.png"
                    size = (100, 90) if i == 2 else (84, 84)
                    Image.new("RGB", size, colour).save(tmp_path / "images" / name)
                    writer.writerow([name, label])
    return tmp_path


def test_miniimagenet_normalises_and_resizes(mini_root):
    train = MiniImageNetDataset(str(mini_root), "train")
    assert train.labels == ("n01", "n02") and train.num_classes == 2
    assert train.samples_per_class == 3 and train.image_shape == (3, 84, 84)
    images = train.gather(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2]))
    assert images.shape == (3, 3, 84, 84) and images.dtype == torch.float32
    for image, colour in zip(images, [(255, 0, 0), (128, 128, 128), (10, 20, 30)]):
        expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
        assert torch.allclose(image, expected.expand(3, 84, 84), atol=0.1)  # the JPEG is close, PNGs exact
    assert torch.allclose(images[0], ((torch.tensor([1.0, 0, 0]).view(3, 1, 1) - MEAN) / STD).expand(3, 84, 84))


def test_miniimagenet_sampler_from_config(mini_root):
    cfg = DataConfig(name="miniimagenet", root=str(mini_root), ways=2, shots=1, queries=2)
    batch = build_sampler(cfg, "train", meta_batch=2, seed=0).sample()
    assert batch.support_x.shape == (2, 2, 3, 84, 84) and batch.query_x.shape == (2, 4, 3, 84, 84)
    with pytest.raises(ValueError, match="2-way tasks need at least 2 classes, the split has 1"):
        build_sampler(cfg, "val", meta_batch=1, seed=0)


def test_miniimagenet_missing_files_show_the_layout(tmp_path, mini_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)no train.csv in .*empty.*train.csv, val.csv, test.csv.*images/<filename>"):
        (tmp_path / "empty").mkdir()
        build_dataset(DataConfig(name="miniimagenet", root=str(tmp_path / "empty")), "train")
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*images/<filename>"):
        MiniImageNetDataset(str(tmp_path / "nowhere"), "val")
    (mini_root / "images" / "n010000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images listed in train.csv are not in .*n010000.png"):
        MiniImageNetDataset(str(mini_root), "train")


def test_miniimagenet_malformed_csv(mini_root):
    (mini_root / "val.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="must start with the header 'filename,label'"):
        MiniImageNetDataset(str(mini_root), "val")
    (mini_root / "test.csv").write_text("filename,label\na.jpg\n")
    with pytest.raises(ValueError, match="line 2 has 1 fields"):
        MiniImageNetDataset(str(mini_root), "test")
