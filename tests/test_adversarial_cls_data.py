"""Adversarial classification data: symlink loops and duplicates, 16-bit and float images, and
splits of which not one image can be read (each was silently wrong before)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_cls_config import load_tool
from test_cls_data import make_image_folder
from test_cls_train import tiny_args
from torchvision import transforms as T

from classification.data import BadSample, ImageFolderDataset, scan_split
from classification.gpu_decode import EncodedImageDataset, GpuDecoder, collate_encoded
from rwdet.run.errors import UserError

GRADIENT = np.linspace(0, 65535, 64 * 64).reshape(64, 64)  # mean exactly half of full scale


def rel(samples, root):
    return [(os.path.relpath(p, root), t) for p, t in samples]


def write_png(path, color=(200, 40, 40)):
    Image.new("RGB", (8, 8), color).save(path)


# ---------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize(
    "link,target", [("a/loop", "."), ("a/sub/up", ".."), ("a/sub/split", "../..")]
)
def test_symlink_loops_list_each_image_once(tmp_path, link, target):
    """``loop -> .`` used to list every image 41 times (until ELOOP); a link to the split
    folder also pulled the other classes' images into this class."""
    train = tmp_path / "train"
    for c in ("a", "b"):
        (train / c / "sub").mkdir(parents=True)
        write_png(train / c / "0.png")
        write_png(train / c / "sub" / "1.png")
    os.symlink(target, train / link)
    samples, classes = scan_split(str(train))
    assert classes == ["a", "b"]
    assert rel(samples, train) == [
        ("a/0.png", 0), ("a/sub/1.png", 0), ("b/0.png", 1), ("b/sub/1.png", 1),
    ]  # fmt: skip


def test_file_reached_twice_through_symlinks_is_listed_once(tmp_path):
    """Symlinks to files and folders outside the root are followed (subsets of a dataset are
    built that way), but a file met twice in a class counts once; a broken link is listed and
    then skipped as unreadable."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_png(outside / "b.png")
    a = tmp_path / "val" / "a"
    a.mkdir(parents=True)
    write_png(a / "a.png")
    os.symlink(a / "a.png", a / "a_again.png")
    os.symlink(outside / "b.png", a / "b_link.png")
    os.symlink(outside, a / "more")  # holds b.png again
    os.symlink(tmp_path / "missing.png", a / "broken.png")
    samples, _ = scan_split(str(tmp_path / "val"))
    names = [p for p, _ in rel(samples, a)]
    assert names == ["a.png", "b_link.png", "broken.png"]
    ds = ImageFolderDataset(samples, ["a"], T.ToTensor())
    assert [isinstance(ds[i], BadSample) for i in range(3)] == [False, False, True]


def test_unlistable_sub_folder_is_an_error_not_a_silent_gap(tmp_path, monkeypatch):
    """``os.walk`` skipped a folder it could not list (permissions), dropping its images."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    write_png(tmp_path / "a" / "0.png")
    write_png(tmp_path / "a" / "sub" / "1.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=r"cannot list the image folder .*sub.*Permission denied"):
        scan_split(str(tmp_path))


# ---------------------------------------------------------------------------- bit depth


def save_wide(path, mode, top=65535):
    """A gradient from 0 to ``top`` (0 to 1 for float "F") in ``mode``, written by PIL."""
    if mode == "I;16":
        img = Image.frombytes("I;16", (64, 64), GRADIENT.astype("<u2").tobytes())
    elif mode == "I":
        img = Image.fromarray((GRADIENT * (top / 65535)).astype(np.int32))
    else:
        img = Image.fromarray((GRADIENT / 65535).astype(np.float32))  # float "F": 0..1
    assert img.mode == mode
    img.save(path)


@pytest.mark.parametrize(
    "name,mode,top",
    [("g.png", "I;16", 0), ("g.tif", "I;16", 0), ("g.tif", "I", 65535), ("g.tif", "I", 2**20),
     ("g.tif", "F", 0)],
)  # fmt: skip
def test_wide_grey_images_are_scaled_not_clipped(tmp_path, name, mode, top):
    """``convert("RGB")`` clipped: 99.6% of a 16-bit gradient became 255 (mean 0.998).
    16-bit and "I" up to 65535 are divided by 257, larger "I" by their maximum, "F" 0..1 x 255."""
    (tmp_path / "a").mkdir()
    save_wide(tmp_path / "a" / name, mode, top)
    samples, classes = scan_split(str(tmp_path))
    x, _ = ImageFolderDataset(samples, classes, T.ToTensor())[0]
    assert x.shape == (3, 64, 64)
    assert abs(x.mean().item() - 0.5) < 0.01 and x.max().item() == 1.0 and x.min().item() == 0.0


@pytest.mark.parametrize("train", [False, True])
def test_gpu_decode_scales_16_bit_png(tmp_path, train):
    """torchvision decodes a 16-bit PNG to uint16, which was then normalised as if 8-bit."""
    (tmp_path / "a").mkdir()
    save_wide(tmp_path / "a" / "g.png", "I;16")
    samples, classes = scan_split(str(tmp_path))
    ds = EncodedImageDataset(samples, classes)
    images, _, bad = GpuDecoder(32, train=train, device="cpu")(collate_encoded([ds[(0, 3)]]))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = images[0] * std.view(3, 1, 1) + mean.view(3, 1, 1)
    assert bad == [] and 0.0 <= pixels.min() and pixels.max() <= 1.0 + 1e-5
    if not train:  # a center crop of a left-to-right gradient keeps the mean
        assert abs(pixels.mean().item() - 0.5) < 0.02


# ---------------------------------------------------------------------------- no readable image


def break_split(root, split):
    n = 0
    for dirpath, _, files in os.walk(os.path.join(root, split)):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"not an image")
            n += 1
    return n


@pytest.mark.parametrize("split", ["val", "train"])
def test_split_without_one_readable_image_exits_2_before_any_checkpoint(tmp_path, capsys, split):
    """The run exited 0 and wrote best.pth from "0 val images" (or trained a whole epoch on
    nothing); now it stops with one line naming the split folder and writes no checkpoint."""
    data, out = str(tmp_path / "data"), tmp_path / "out"
    make_image_folder(data, classes=2, train_per_class=8, val_per_class=2, size=16, bad=False)
    n = break_split(data, split)
    extra = ["train.complexity", "false", "train.precise_bn", "0"]
    argv = tiny_args(data, str(out), epochs=1, extra=extra)
    assert load_tool().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"not one image of the {split} split" in err, err
    assert repr(os.path.join(data, split)) in err and f"({n} unreadable" in err
    assert "--data" in err
    assert not any(f.endswith(".pth") for f in os.listdir(out))
