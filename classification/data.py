"""Datasets: ImageNet folder layout (corrupt files skipped), Fashion-MNIST from Debian, and
CIFAR-10/100 from the python-pickle batches torchvision reads.

Every sample's random augmentation is drawn from a seed the sampler hands out with its index
(``(index, seed)`` items, see ``classification.sampler``), not from a worker's running RNG. So
the augmented batch at a given step does not depend on the number of workers, on which worker
loads it, or on whether the run was resumed mid-epoch: that is what makes resume exact.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import signal
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from rwdet.run.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # over the 60k training images
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass
class BadSample:
    """Stands in for an image that could not be decoded; the collate function drops it."""

    path: str
    reason: str


@contextmanager
def seeded(seed: int | None):
    """Run a transform with torch and Python RNGs seeded by ``seed``, then restore them.

    Restoring matters when loading happens in the main process: the training RNG (dropout,
    edge drop) must not see how many random numbers the augmentation drew.
    """
    if seed is None:
        yield
        return
    gen = torch.default_generator  # CPU only: torch.manual_seed would also queue CUDA seeding
    torch_state, py_state = gen.get_state(), random.getstate()
    gen.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


def _split_item(item) -> tuple[int, int | None]:
    return (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), None)


# ---------------------------------------------------------------------------- ImageNet layout


def find_split_dir(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data root {root!r} does not exist; pass --data ROOT with ROOT/train/<class>/* "
            f"and ROOT/val/<class>/* (or omit --data to train on Fashion-MNIST)"
        )
    for name in SPLIT_DIRS[split]:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    wanted = " or ".join(f"{root}/{n}" for n in SPLIT_DIRS[split])
    raise FileNotFoundError(
        f"data root {root!r} has no {split} split: expected a folder {wanted} with one "
        f"sub-folder per class"
    )


def scan_split(split_dir: str, classes: list[str] | None = None):
    """``[(path, class index)]`` and the class names of one split (sorted folder names).

    With ``classes`` given (the training classes), every folder here must be one of them.
    """
    found = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not found:
        raise FileNotFoundError(
            f"{split_dir!r} has no class folders; put the images of each class in "
            f"{split_dir}/<class name>/"
        )
    if classes is None:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(
            f"{split_dir!r} has class folders that the training split does not have: "
            f"{unknown[:5]}; train and val must use the same class folder names"
        )
    samples = []
    for name in found:
        folder = os.path.join(split_dir, name)
        files = list_images(folder)
        if not files:
            raise FileNotFoundError(
                f"class folder {folder!r} contains no images (extensions "
                f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
            )
        samples += [(f, index[name]) for f in files]
    return samples, classes


def _kind(entry: os.DirEntry) -> str:
    """One of "dir", "file", "broken" (a symlink to nothing, a loop of links) or "other"."""
    try:
        if entry.is_dir():  # follows symlinks
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # ELOOP, or a target that cannot be examined
        return "broken"
    return "broken" if entry.is_symlink() and not os.path.exists(entry.path) else "other"


def list_images(folder: str) -> list[str]:
    """The image files under ``folder``, following symlinks, each real file once.

    Symlinked folders and files are followed (subsets of a dataset are often built from
    symlinks), but every folder is entered once by its real path, and a folder that contains
    ``folder`` (``loop -> .``, ``up -> ..``) not at all, so loops end and no other class's images
    leak in. A file reachable by several paths (directly and through a symlink) is listed once,
    under the first path met. The order is that of ``os.walk``: files of a folder by sorted name,
    then its sub-folders by sorted name, depth first. A broken symlink is listed like any other
    file: it fails to load, is skipped and is counted (and named) as an unreadable image.
    """
    top = os.path.realpath(folder)
    seen_dirs, seen_files, files = {top}, set(), []
    stack = [(folder, top)]
    while stack:
        path, real = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as e:  # skipping it would drop its images without a word
            raise UserError(
                f"cannot list the image folder {path!r} ({e.strerror}); fix its permissions or "
                f"move it out of {folder!r}"
            ) from None
        entries.sort(key=lambda e: e.name)
        subdirs = []
        for e in entries:
            kind = _kind(e)
            if kind == "dir":
                sub = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                if sub in seen_dirs or top.startswith(sub.rstrip(os.sep) + os.sep):
                    continue
                seen_dirs.add(sub)
                subdirs.append((e.path, sub))
            elif kind != "other" and e.name.lower().endswith(IMG_EXTENSIONS):
                # ("other": a FIFO or socket named like an image would block its reader.)
                link = e.is_symlink()
                target = os.path.realpath(e.path) if link else os.path.join(real, e.name)
                if target not in seen_files:
                    seen_files.add(target)
                    files.append(e.path)
        stack += reversed(subdirs)
    return files


def grey_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of more than 8 bits scaled to 0..255 (``convert("RGB")`` clips them instead:
    a 16-bit grey PNG becomes almost all white).

    "I;16*" modes are divided by 257 (65535 -> 255 exactly). PIL keeps no bit depth for "I"
    (32-bit integer) and "F" (float), so their range is read from the values: at most 1.0 (for
    "F") is taken as 0..1, at most 255 as 8-bit, at most 65535 as 16-bit (divided by 257),
    anything larger is divided by the image's own maximum. Negative values become 0.
    """
    a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, None)
    top = float(a.max()) if a.size else 0.0
    if mode.startswith("I;16") or 255 < top <= 65535:
        a = a / 257.0
    elif top > 65535:
        a = a * (255.0 / top)
    elif mode == "F" and top <= 1.0:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image, with 16-bit, 32-bit integer and float greys scaled, not clipped.

    16-bit RGB PNGs need nothing here: PIL already reduces them to 8 bits per channel.
    """
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img.convert("RGB")
    return Image.fromarray(grey_to_uint8(np.asarray(img), img.mode)).convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in class folders; an unreadable file becomes a ``BadSample`` instead of a crash."""

    def __init__(self, samples, classes, transform):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = _split_item(item)
        path, target = self.samples[index]
        try:
            loaded = self.load(path)
        except Exception as e:  # noqa: BLE001 - any read/decode failure means "skip this file"
            return BadSample(path, f"{type(e).__name__}: {e}")
        return self.finish(loaded, target, index, seed, path)

    def load(self, path: str):
        with open(path, "rb") as f:
            return to_rgb(Image.open(f))  # a full decode: truncation shows up here

    def finish(self, img, target: int, index: int, seed: int | None, path: str):
        with seeded(seed):
            return self.transform(img), target


def imagenet_transforms(train_size: int, test_size: int, test_resize: int | None):
    """The standard recipe: RandomResizedCrop + flip; resize (test/0.875) + center crop."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose(
        [T.RandomResizedCrop(train_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    )
    resize = test_resize or round(test_size / 0.875)
    val = T.Compose([T.Resize(resize), T.CenterCrop(test_size), T.ToTensor(), normalize])
    return train, val


# ---------------------------------------------------------------------------- Fashion-MNIST


def _open_idx(directory: str, stem: str):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory!r}. Install the embedded "
        f"default data with:  sudo apt-get install dataset-fashion-mnist  "
        f"(or pass --data ROOT with a folder in ImageNet layout)"
    )


def read_idx(path: str) -> torch.Tensor:
    """An idx file (the MNIST format: magic, dims, big-endian payload) as a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path!r} is not an idx file (too short)")
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise ValueError(f"{path!r} is not an unsigned-byte idx file (bad magic number)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    payload = raw[4 + 4 * ndim :]
    if len(payload) != int(np.prod(dims)):
        raise ValueError(f"{path!r} is truncated: expected {int(np.prod(dims))} bytes of data")
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy())


def load_fashion_mnist(directory: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_stem, labels_stem = FMNIST_FILES[split]
    images = read_idx(_open_idx(directory, images_stem))
    labels = read_idx(_open_idx(directory, labels_stem)).long()
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} files in {directory!r} do not match: images "
            f"{tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    return images, labels


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory images: pad-and-crop + flip for training, as for CIFAR.

    ``images`` are uint8, ``(N, H, W)`` (grayscale) or ``(N, C, H, W)``; ``mean``/``std`` one
    value or one per channel (default: Fashion-MNIST's). Images are normalised and padded once
    up front, the padding being the normalised value of black (as torchvision's
    ``RandomCrop(padding=...)`` before ``Normalize``); an item is then a crop of a float
    tensor, with its offsets and flip drawn from a generator seeded by the item's sample seed.
    """

    def __init__(
        self,
        images,
        labels,
        classes,
        size: int,
        train: bool,
        pad: int = 2,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
    ):
        x = (images.unsqueeze(1) if images.ndim == 3 else images).float().div_(255.0)
        mean = torch.tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.tensor(std, dtype=torch.float64).reshape(-1)
        x.sub_(mean.to(x.dtype).reshape(1, -1, 1, 1)).div_(std.to(x.dtype).reshape(1, -1, 1, 1))
        if x.shape[-1] != size:
            x = torch.cat(
                [
                    torch.nn.functional.interpolate(c, size=(size, size), mode="bilinear")
                    for c in x.split(4096)
                ]
            )
        self.pad = pad if train else 0
        if self.pad:
            n, c, h, w = x.shape
            black = (-mean / std).to(x.dtype).expand(c).reshape(1, c, 1, 1)
            padded = black.expand(n, c, h + 2 * pad, w + 2 * pad).clone()
            padded[:, :, pad : pad + h, pad : pad + w] = x
            x = padded
        self.x, self.labels, self.classes = x, labels, classes
        self.size, self.train = size, train

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        index, seed = _split_item(item)
        label = int(self.labels[index])
        if not self.train:
            return self.x[index].clone(), label
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        i, j = torch.randint(0, 2 * self.pad + 1, (2,), generator=g).tolist()
        flip = bool(torch.randint(0, 2, (), generator=g))
        x = self.x[index, :, i : i + self.size, j : j + self.size]
        return (x.flip(-1) if flip else x.clone()), label


# ---------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision's ``CIFAR10``/``CIFAR100(root, download=False)`` find the batches."""

    folder: str  # under root
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Normalisation as the edge-popup authors' data/cifar.py (allenai/hidden-networks): the
# CIFAR-10 training-set channel mean/std rounded to 3 digits. CIFAR-100's own statistics over
# its 50k training images (the authors have no CIFAR-100 loader).
CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
        (0.491, 0.482, 0.447),
        (0.247, 0.243, 0.262),
    ),
    "cifar100": CifarLayout(
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        b"fine_labels",
        b"fine_label_names",
        (0.507, 0.487, 0.441),
        (0.267, 0.256, 0.276),
    ),
}
CIFAR_PAD = 4  # RandomCrop(32, padding=4) + RandomHorizontalFlip, as the authors' data/cifar.py


def cifar_dir(name: str, root: str) -> str:
    """The batches folder: ``root/<folder>`` (torchvision's root) or ``root`` itself."""
    layout = CIFAR[name]
    for folder in (os.path.join(root, layout.folder), root):
        if os.path.isfile(os.path.join(folder, layout.meta)):
            return folder
    files = ", ".join((*layout.train, layout.test, layout.meta))
    raise UserError(
        f"{name} data not found at {root!r}: expected the python-pickle batches ({files}) in "
        f"{os.path.join(root, layout.folder)}/ (unpack the official "
        f"{layout.folder.replace('-batches-py', '').replace('-python', '')}-python.tar.gz "
        f"there; nothing is downloaded), then pass --data {name}:ROOT"
    )


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(
            f"CIFAR file {path!r} is missing; the batches folder must hold every file of the "
            f"official python archive (unpack it again)"
        )
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")  # the archives are Python 2 pickles
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise UserError(f"CIFAR file {path!r} cannot be read ({e}); unpack it again") from None


def load_cifar(name: str, root: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(uint8 images (N, 3, 32, 32), labels, class names) of one split."""
    layout = CIFAR[name]
    folder = cifar_dir(name, root)
    meta = _unpickle(os.path.join(folder, layout.meta))
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta[layout.names_key]]
    images, labels = [], []
    for file in layout.train if split == "train" else (layout.test,):
        path = os.path.join(folder, file)
        batch = _unpickle(path)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[layout.label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise UserError(
                f"CIFAR file {path!r} is not a {name} batch ({type(e).__name__}: {e})"
            ) from None
        if len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() >= len(classes))):
            raise UserError(
                f"CIFAR file {path!r}: {len(data)} images, {len(y)} labels in "
                f"0..{len(classes) - 1} expected"
            )
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(y))
    return torch.cat(images), torch.cat(labels), classes


def cifar_datasets(name: str, root: str, train_size: int, test_size: int, train: bool):
    layout = CIFAR[name]
    val_x, val_y, classes = load_cifar(name, root, "val")
    norm = {"mean": layout.mean, "std": layout.std}
    val = TensorImageDataset(val_x, val_y, classes, test_size, False, **norm)
    train_set = None
    if train:
        tr_x, tr_y, _ = load_cifar(name, root, "train")
        train_set = TensorImageDataset(tr_x, tr_y, classes, train_size, True, CIFAR_PAD, **norm)
    return train_set, val, classes


# ---------------------------------------------------------------------------- building


def build_datasets(cfg: dict, train: bool = True, classes: list[str] | None = None):
    """(train dataset or None, val dataset, class names, input channels) for a config.

    ``classes`` (from a checkpoint) fixes the label order when only evaluating.
    """
    data = cfg["data"]
    if data["name"] == "fashion_mnist":
        directory = data["fashion_mnist_dir"]
        val_x, val_y = load_fashion_mnist(directory, "val")
        val = TensorImageDataset(val_x, val_y, FMNIST_CLASSES, data["test_size"], False)
        train_set = None
        if train:
            tr_x, tr_y = load_fashion_mnist(directory, "train")
            train_set = TensorImageDataset(tr_x, tr_y, FMNIST_CLASSES, data["train_size"], True)
        return train_set, val, FMNIST_CLASSES, 1
    root = data["root"]
    if data["name"] in CIFAR:
        sizes = data["train_size"], data["test_size"]
        return (*cifar_datasets(data["name"], root, *sizes, train), 3)
    train_tf, val_tf = imagenet_transforms(
        data["train_size"], data["test_size"], data["test_resize"]
    )
    train_set = None
    if train:
        samples, classes = scan_split(find_split_dir(root, "train"))
        train_set = ImageFolderDataset(samples, classes, train_tf)
    val_samples, classes = scan_split(find_split_dir(root, "val"), classes)
    return train_set, ImageFolderDataset(val_samples, classes, val_tf), classes, 3


def split_location(cfg: dict, split: str) -> str:
    """The folder (or Fashion-MNIST file) a split's images come from, for messages."""
    data = cfg["data"]
    if data["name"] == "fashion_mnist":
        return os.path.join(data["fashion_mnist_dir"], FMNIST_FILES[split][0])
    if data["name"] in CIFAR:
        layout = CIFAR[data["name"]]
        file = layout.train[0] if split == "train" else layout.test
        return os.path.join(cifar_dir(data["name"], data["root"]), file)
    return find_split_dir(data["root"], split)


def no_readable_images(cfg: dict, split: str, skipped: int, when: str = "") -> UserError:
    """The error for a split of which not one image could be read: training on nothing, or
    keeping a "best" checkpoint scored on 0 images, would end a run with exit code 0."""
    return UserError(
        f"not one image of the {split} split {split_location(cfg, split)!r} could be read"
        f"{when} ({skipped} unreadable, named in the warnings above); replace or remove the "
        f"broken files, or pass --data ROOT with readable images"
    )


def collate_skip_bad(batch):
    """Stack the good samples; return the bad ones separately so the trainer counts them."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    images = torch.stack([g[0] for g in good])
    targets = torch.tensor([g[1] for g in good], dtype=torch.long)
    return images, targets, bad


def worker_init(worker_id: int) -> None:
    """Seed NumPy and Python in each worker from its torch seed (torch seeds only itself).

    Workers ignore SIGTERM and SIGINT: SLURM and a terminal's Ctrl-C signal the whole process
    group, and a worker dying of it would break the main process's stop-and-save
    (``rwdet.run.stop``); the main process ends the workers when it is done.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
