"""Decode JPEGs on the GPU (``torchvision.io.decode_jpeg(device="cuda")``) for machines whose
few CPU cores cannot keep up with PIL decoding.

Workers only read file bytes; the batch is decoded, cropped, flipped and normalised on the
device. Augmentation uses the same per-sample seeds as the CPU path
(``classification.sampler``), so resume stays exact. Files that do not decode are dropped and
counted, like ``BadSample`` on the CPU path. Works with ``device="cpu"`` too (that is how the
tests exercise it without a GPU).
"""

from __future__ import annotations

import torch
import torchvision
from torchvision.io import ImageReadMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from classification.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadSample,
    ImageFolderDataset,
    seeded,
)


class EncodedImageDataset(ImageFolderDataset):
    """``(file bytes, target, seed, path)``; decoding is left to ``GpuDecoder``.

    Plain ``bytes`` (not tensors) cross the worker boundary: hundreds of small shared-memory
    tensors per batch exhaust file descriptors in the DataLoader's sharing strategy.
    """

    def __init__(self, samples, classes):
        super().__init__(samples, classes, transform=None)

    def load(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def finish(self, data: bytes, target: int, index: int, seed: int | None, path: str):
        return data, target, index if seed is None else seed, path


def collate_encoded(batch):
    good = [b for b in batch if not isinstance(b, BadSample)]
    return {
        "data": [torch.frombuffer(bytearray(b[0]), dtype=torch.uint8) for b in good],
        "target": torch.tensor([b[1] for b in good], dtype=torch.long),
        "seed": [int(b[2]) for b in good],
        "path": [b[3] for b in good],
        "bad": [(b.path, b.reason) for b in batch if isinstance(b, BadSample)],
    }


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """16-bit PNGs decode to uint16; scaled by 1/257 as on the CPU path (``data.to_rgb``), not
    normalised as if they were 8-bit (which made every pixel over 100x too bright)."""
    if img.dtype == torch.uint8:
        return img
    return img.float().div_(257.0).round_().clamp_(0, 255).to(torch.uint8)


class GpuDecoder:
    """Batch -> normalised float images on ``device``: RandomResizedCrop + flip, or resize +
    center crop for evaluation (the CPU path's recipe)."""

    def __init__(self, size: int, train: bool, device, test_resize: int | None = None):
        self.size, self.train, self.device = size, train, torch.device(device)
        self.resize = test_resize or round(size / 0.875)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(3, 1, 1)

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        dev = "cuda" if self.device.type == "cuda" else "cpu"
        try:
            return list(torchvision.io.decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev))
        except RuntimeError:  # one bad or non-JPEG file fails the whole batch: go one by one
            out = []
            for d in datas:
                try:
                    img = to_uint8(torchvision.io.decode_image(d, mode=ImageReadMode.RGB))
                    out.append(img.to(self.device, non_blocking=True))
                except RuntimeError:
                    out.append(None)
            return out

    def _augment(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.train:
            return F.center_crop(F.resize(img, self.resize, antialias=True), self.size)
        gen = torch.Generator().manual_seed(seed)
        # seeded(): the CPU generator only; torch.manual_seed would also reseed CUDA's, whose
        # stream (dropout, edge drop on the GPU) must not depend on the last image's seed.
        with seeded(int(torch.randint(2**31, (), generator=gen))):
            top, left, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
            flip = bool(torch.rand(()) < 0.5)
        img = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        return F.horizontal_flip(img) if flip else img

    def __call__(self, batch: dict):
        """``(images or None, targets or None, [(path, reason) of files that failed])``, the
        triple the CPU path's ``collate_skip_bad`` gives the trainer."""
        decoded = self._decode(batch["data"]) if batch["data"] else []
        keep = [i for i, img in enumerate(decoded) if img is not None]
        bad = list(batch["bad"])
        bad += [(batch["path"][i], "decode failed") for i, img in enumerate(decoded) if img is None]
        if not keep:
            return None, None, bad
        images = torch.stack([self._augment(decoded[i], batch["seed"][i]) for i in keep])
        images = (images.float().div_(255) - self.mean) / self.std
        targets = batch["target"][keep].to(self.device, non_blocking=True)
        return images, targets, bad


class DecodingLoader:
    """A DataLoader of encoded batches that yields decoded ones (same length, same order)."""

    def __init__(self, loader, decoder: GpuDecoder):
        self.loader, self.decoder = loader, decoder

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.decoder(batch)
