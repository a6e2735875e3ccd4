#!/usr/bin/env python
"""Training-loader throughput: PIL decode on CPU workers vs JPEG decode on the GPU.

python benchmarks/decode.py --device cuda --workers 4            # synthetic 500x375 JPEGs
python benchmarks/decode.py --device cuda --data /data/imagenet  # real files (train split)
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from classification.data import (  # noqa: E402
    ImageFolderDataset,
    find_split_dir,
    imagenet_transforms,
    scan_split,
)
from classification.gpu_decode import EncodedImageDataset, GpuDecoder, collate_encoded  # noqa: E402


def synthetic_folder(root: str, n: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, "train", f"c{i % 4}")
        os.makedirs(d, exist_ok=True)
        # Smooth noise compresses like a photo, unlike white noise.
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375)).save(os.path.join(d, f"{i}.jpg"), quality=90)
    return root


def measure(loader, step, limit: int) -> float:
    seen, start = 0, None
    for i, batch in enumerate(loader):
        images = step(batch)
        if i == 0:  # the first batch pays worker start-up
            start = time.perf_counter()
            continue
        seen += images.shape[0]
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or synthetic_folder(tmp, args.images)
        samples, classes = scan_split(find_split_dir(root, "train"))
        samples = samples[: args.images]
        train_tf, _ = imagenet_transforms(224, 224, None)
        dev = torch.device(args.device)

        def order(n):
            return [(i, i) for i in range(n)]

        cpu = torch.utils.data.DataLoader(
            ImageFolderDataset(samples, classes, train_tf),
            batch_size=args.batch,
            sampler=order(len(samples)),
            num_workers=args.workers,
            pin_memory=dev.type == "cuda",
        )
        cpu_rate = measure(cpu, lambda b: b[0].to(dev, non_blocking=True), len(samples) // 2)
        gpu_loader = torch.utils.data.DataLoader(
            EncodedImageDataset(samples, classes),
            batch_size=args.batch,
            sampler=order(len(samples)),
            num_workers=args.workers,
            collate_fn=collate_encoded,
        )
        decoder = GpuDecoder(224, train=True, device=dev)

        def gpu_step(batch):
            images = decoder(batch)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return images

        gpu_rate = measure(gpu_loader, gpu_step, len(samples) // 2)
    print(f"device {dev}, workers {args.workers}, batch {args.batch}")
    print(f"  CPU decode (PIL, {args.workers} workers): {cpu_rate:8.1f} img/s")
    print(f"  decode_jpeg on {dev.type}:               {gpu_rate:8.1f} img/s")
    print(f"  ratio: {gpu_rate / cpu_rate:.2f}x")


if __name__ == "__main__":
    main()
