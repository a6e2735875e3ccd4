"""CIFAR-10/100 read from torchvision's python-pickle batches (a stand-in written here in the
same layout: Python pickles with bytes keys b'data' (N x 3072 uint8, channel-major) and
b'labels' / b'fine_labels'), the `--data cifar10:ROOT` spelling and the missing-root error."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from classification.config import resolve
from classification.data import CIFAR, build_datasets, load_cifar
from rwdet.run.errors import UserError

PER_BATCH = 6  # images per training batch file of the stand-in


def _write(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official archives are Python 2 pickles


def write_standin(root: str, name: str = "cifar10", n_test: int = 4) -> dict:
    """A tiny CIFAR archive; returns the images and labels written, per split."""
    layout = CIFAR[name]
    folder = os.path.join(root, layout.folder)
    os.makedirs(folder)
    n_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(0)
    names = [f"class{i}".encode() for i in range(n_classes)]
    _write(os.path.join(folder, layout.meta), {layout.names_key: names})
    written = {"train": ([], []), "val": ([], [])}
    for split, files, n in (("train", layout.train, PER_BATCH), ("val", (layout.test,), n_test)):
        for file in files:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, n_classes, n)]
            _write(os.path.join(folder, file), {b"data": data, layout.label_key: labels})
            written[split][0].append(data)
            written[split][1].extend(labels)
    return {k: (np.concatenate(x), y) for k, (x, y) in written.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_standin_read_with_shapes_labels_and_order(tmp_path, name):
    written = write_standin(str(tmp_path), name)
    images, labels, classes = load_cifar(name, str(tmp_path), "train")
    n_train = PER_BATCH * len(CIFAR[name].train)
    assert images.shape == (n_train, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == written["train"][1]
    # Row-major 3072 bytes = R plane, G plane, B plane of 32x32 (CIFAR's documented layout).
    assert torch.equal(images[1, 2, 0, :5], torch.from_numpy(written["train"][0][1, 2048:2053]))
    assert len(classes) == (10 if name == "cifar10" else 100) and classes[3] == "class3"
    test_images, test_labels, _ = load_cifar(name, str(tmp_path), "val")
    assert test_images.shape == (4, 3, 32, 32) and test_labels.tolist() == written["val"][1]


def test_data_prefix_builds_normalised_padded_datasets(tmp_path):
    written = write_standin(str(tmp_path))
    cfg = resolve(
        None,
        {"data": {"root": f"cifar10:{tmp_path}", "train_size": 32, "test_size": 32}},
    )
    assert cfg["data"]["name"] == "cifar10" and cfg["data"]["root"] == str(tmp_path)
    train_set, val, classes, in_ch = build_datasets(cfg)
    assert in_ch == 3 and len(classes) == 10 and len(train_set) == 5 * PER_BATCH
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y == written["val"][1][0]
    mean, std = CIFAR["cifar10"].mean, CIFAR["cifar10"].std
    raw = written["val"][0][0].reshape(3, 32, 32)
    expected = (raw[:, 0, 0] / 255.0 - np.array(mean)) / np.array(std)
    assert np.allclose(x[:, 0, 0].numpy(), expected, atol=1e-5)
    # Training crops come from a 4-pixel black border (RandomCrop(32, padding=4)).
    assert train_set.x.shape[-1] == 40
    corner = train_set.x[0, :, 0, 0].numpy()
    assert np.allclose(corner, -np.array(mean) / np.array(std), atol=1e-5)
    crops = {tuple(train_set[(0, s)][0][0, :, 0].tolist()[:8]) for s in range(12)}
    assert len(crops) > 1  # the crop offset or flip depends on the sample seed
    assert torch.equal(train_set[(0, 7)][0], train_set[(0, 7)][0])


def test_batches_folder_itself_accepted(tmp_path):
    write_standin(str(tmp_path))
    images, _, _ = load_cifar("cifar10", str(tmp_path / "cifar-10-batches-py"), "val")
    assert images.shape[0] == 4


def test_missing_root_names_the_files_and_where(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar("cifar10", str(tmp_path / "nowhere"), "train")
    msg = str(e.value)
    assert "data_batch_1" in msg and "batches.meta" in msg and "cifar-10-batches-py" in msg
    assert "\n" not in msg


def test_missing_batch_file_is_named(tmp_path):
    write_standin(str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3"):
        load_cifar("cifar10", str(tmp_path), "train")


def test_cifar_name_without_root_is_a_user_error():
    with pytest.raises(UserError, match="cifar100:ROOT"):
        resolve(None, None, ["data.name", "cifar100"])
