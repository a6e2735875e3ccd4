"""Classification data: ImageNet folder layout, bad files, Fashion-MNIST idx reader, samplers."""

import gzip
import os
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from classification.config import resolve
from classification.data import (
    BadSample,
    ImageFolderDataset,
    TensorImageDataset,
    build_datasets,
    collate_skip_bad,
    find_split_dir,
    load_fashion_mnist,
    read_idx,
    scan_split,
    seeded,
)
from classification.sampler import EvalSampler, TrainSampler, subset_indices

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def make_image_folder(root, classes=3, train_per_class=32, val_per_class=6, size=32, bad=True):
    """A tiny ImageNet-layout set: each class has its own dominant color (a learnable signal).

    With ``bad``, train/class0 gets a corrupt JPEG and a truncated PNG and val/class1 a corrupt
    JPEG. Returns the number of good val images.
    """
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-50, 50, (size, size, 3))
                arr = np.clip(np.array(COLORS[c]) + noise, 0, 255).astype(np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(arr).save(os.path.join(folder, f"img{i:03d}.{ext}"))
    if bad:
        with open(os.path.join(root, "train", "class0", "corrupt.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        good = os.path.join(root, "train", "class0", "img001.png")
        with open(good, "rb") as f:
            payload = f.read()
        with open(os.path.join(root, "train", "class0", "truncated.png"), "wb") as f:
            f.write(payload[: len(payload) // 2])
        with open(os.path.join(root, "val", "class1", "broken.jpg"), "wb") as f:
            f.write(b"garbage")
    return classes * val_per_class


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fashion_mnist(directory, n_train=20, n_val=10, gz=True):
    os.makedirs(directory, exist_ok=True)
    sfx = ".gz" if gz else ""
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(
            os.path.join(directory, f"{prefix}-images-idx3-ubyte{sfx}"),
            rng.integers(0, 256, (n, 28, 28)),
        )
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{sfx}"), np.arange(n) % 10)


# ---------------------------------------------------------------------------- ImageNet layout


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--data ROOT"):
        find_split_dir(str(tmp_path / "nope"), "train")


def test_missing_split_names_the_expected_folders(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no val split.*val or .*validation"):
        find_split_dir(str(tmp_path), "val")


def test_validation_folder_is_accepted(tmp_path):
    (tmp_path / "validation" / "a").mkdir(parents=True)
    assert find_split_dir(str(tmp_path), "val").endswith("validation")


def test_empty_class_folder_is_a_clear_error(tmp_path):
    make_image_folder(str(tmp_path), classes=2, train_per_class=2, val_per_class=1, bad=False)
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "train" / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty_class.*contains no images"):
        scan_split(str(tmp_path / "train"))


def test_split_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        scan_split(str(tmp_path / "train"))


def test_val_class_unknown_to_train(tmp_path):
    make_image_folder(str(tmp_path), classes=2, train_per_class=2, val_per_class=1, bad=False)
    os.rename(tmp_path / "val" / "class1", tmp_path / "val" / "zebra")
    _, classes = scan_split(str(tmp_path / "train"))
    with pytest.raises(ValueError, match="zebra"):
        scan_split(str(tmp_path / "val"), classes)


def test_corrupt_and_truncated_files_are_skipped_and_counted(tmp_path):
    make_image_folder(str(tmp_path), classes=2, train_per_class=4, val_per_class=1)
    cfg = resolve(None, {"data": {"root": str(tmp_path), "train_size": 16, "test_size": 16}})
    train_set, val_set, classes, in_ch = build_datasets(cfg)
    assert classes == ["class0", "class1"] and in_ch == 3
    assert len(train_set) == 2 * 4 + 2  # the bad files are listed, then skipped on load
    bad = [train_set[i] for i in range(len(train_set)) if isinstance(train_set[i], BadSample)]
    assert sorted(os.path.basename(b.path) for b in bad) == ["corrupt.jpg", "truncated.png"]
    assert any("truncated" in b.reason for b in bad)
    loader = DataLoader(train_set, batch_size=4, collate_fn=collate_skip_bad, num_workers=1)
    seen, skipped = 0, []
    for images, targets, bad_batch in loader:
        skipped += bad_batch
        if images is not None:
            assert images.shape[1:] == (3, 16, 16)
            seen += len(targets)
    assert seen == 8 and len(skipped) == 2


def test_imagenet_transforms_sizes(tmp_path):
    make_image_folder(str(tmp_path), classes=2, train_per_class=2, val_per_class=1, bad=False)
    flags = {"data": {"root": str(tmp_path), "train_size": 24, "test_size": 20}}
    train_set, val_set, _, _ = build_datasets(resolve(None, flags))
    assert train_set[(0, 5)][0].shape == (3, 24, 24)
    assert val_set[0][0].shape == (3, 20, 20)
    # The same sample seed gives the same augmentation, whatever the global RNG did before.
    a = train_set[(1, 123)][0]
    torch.rand(100)
    assert torch.equal(a, train_set[(1, 123)][0])
    assert not torch.equal(a, train_set[(1, 124)][0])


def test_seeded_restores_global_rngs():
    torch.manual_seed(3)
    random.seed(3)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(3)
    random.seed(3)
    with seeded(99):
        torch.rand(10)
        random.random()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# ---------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader(tmp_path, gz):
    make_fashion_mnist(str(tmp_path), n_train=12, n_val=7, gz=gz)
    x, y = load_fashion_mnist(str(tmp_path), "val")
    assert x.shape == (7, 28, 28) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_idx_reader_rejects_bad_files(tmp_path):
    path = str(tmp_path / "x-idx3-ubyte")
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    cfg = resolve(None, {"data": {"fashion_mnist_dir": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_datasets(cfg)


def test_fashion_mnist_dataset_items(tmp_path):
    make_fashion_mnist(str(tmp_path), n_train=20, n_val=10)
    cfg = resolve(None, {"data": {"fashion_mnist_dir": str(tmp_path)}})
    train_set, val_set, classes, in_ch = build_datasets(cfg)
    assert (len(train_set), len(val_set), len(classes), in_ch) == (20, 10, 10, 1)
    x, y = train_set[(3, 7)]
    assert x.shape == (1, 28, 28) and y == 3
    assert torch.equal(x, train_set[(3, 7)][0])
    flips = {bool(torch.equal(train_set[(3, s)][0], train_set[(3, 0)][0])) for s in range(40)}
    assert flips == {True, False}  # different seeds give different crops/flips
    assert val_set[4][0].shape == (1, 28, 28)
    resized = TensorImageDataset(torch.zeros(2, 28, 28, dtype=torch.uint8), [0, 1], classes, 32, 0)
    assert resized[0][0].shape == (1, 32, 32)


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist absent"
)
def test_real_fashion_mnist_sizes():
    x, y = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "val")
    assert x.shape == (10000, 28, 28) and sorted(set(y.tolist())) == list(range(10))


# ---------------------------------------------------------------------------- samplers


def test_train_sampler_is_deterministic_and_resumable():
    s = TrainSampler(range(50), batch_size=4, seed=5)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 12 * 4 == len(s)  # 50 // 4 full batches
    assert list(s) == full
    s.set_epoch(2, start_batch=5)
    assert list(s) == full[20:] and len(s) == 28
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new order each epoch


def test_train_sampler_shards_cover_every_index():
    shards = []
    for rank in range(3):
        s = TrainSampler(range(10, 34), batch_size=2, seed=1, rank=rank, world=3)
        s.set_epoch(0)
        shards.append([i for i, _ in s])
    assert all(len(sh) == 8 for sh in shards)
    assert sorted(sum(shards, [])) == list(range(10, 34))  # disjoint, and all covered


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_sampler_counts_each_image_once(world):
    seen = sum((list(EvalSampler(11, r, world)) for r in range(world)), [])
    assert sorted(seen) == list(range(11))


def test_subset_indices():
    a = subset_indices(100, 10, seed=0)
    assert a == subset_indices(100, 10, seed=0) and len(set(a)) == 10
    assert subset_indices(5, None, 0) == list(range(5))
    with pytest.raises(ValueError, match="train_subset"):
        subset_indices(100, 0, 0)


def test_image_folder_dataset_counts_in_loader_with_workers(tmp_path):
    make_image_folder(str(tmp_path), classes=2, train_per_class=3, val_per_class=1)
    samples, classes = scan_split(str(tmp_path / "val"))
    ds = ImageFolderDataset(samples, classes, lambda img: torch.zeros(1))
    out = list(DataLoader(ds, batch_size=8, collate_fn=collate_skip_bad, num_workers=2))
    assert sum(len(t) for _, t, _ in out) == 2 and sum(len(b) for _, _, b in out) == 1
