"""The GPU JPEG-decoding data path, exercised on the CPU (and on CUDA when present)."""

import pytest
import torch
from PIL import Image

from classification.data import scan_split
from classification.gpu_decode import EncodedImageDataset, GpuDecoder, collate_encoded


def make_folder(root):
    for c, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 8 * i, 36), color).save(root / c / f"{i}.jpg", quality=90)
    Image.new("RGB", (30, 30), (0, 255, 0)).save(root / "a" / "png.png")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return root


def run(tmp_path, device, train):
    samples, classes = scan_split(str(make_folder(tmp_path / "train")))
    ds = EncodedImageDataset(samples, classes)
    batch = collate_encoded([ds[(i, 100 + i)] for i in range(len(ds))])
    return GpuDecoder(32, train=train, device=device)(batch), samples


@pytest.mark.parametrize("train", [True, False])
def test_decodes_augments_and_skips_corrupt_files(tmp_path, train):
    (images, targets, bad), samples = run(tmp_path, "cpu", train)
    assert [p.endswith("corrupt.jpg") for p, _ in bad] == [True]
    assert images.shape == (len(samples) - 1, 3, 32, 32)
    assert targets.tolist() == [t for p, t in samples if "corrupt" not in p]
    # Normalised with the ImageNet statistics: a red image has a high red channel.
    assert images[0, 0].mean() > 1.0 and images[0, 2].mean() < -1.0


def test_same_seed_same_crop(tmp_path):
    samples, classes = scan_split(str(make_folder(tmp_path / "train")))
    ds = EncodedImageDataset(samples, classes)
    dec = GpuDecoder(16, train=True, device="cpu")
    a = dec(collate_encoded([ds[(1, 7)], ds[(2, 8)]]))[0]
    b = dec(collate_encoded([ds[(1, 7)], ds[(2, 8)]]))[0]
    assert torch.equal(a, b)


def test_augmentation_leaves_the_global_generators_alone(tmp_path, monkeypatch):
    """Crops are seeded per image without touching CUDA's generator or the CPU stream."""
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    before = torch.get_rng_state()
    run(tmp_path, "cpu", True)
    assert cuda_seeds == [] and torch.equal(torch.get_rng_state(), before)


@pytest.mark.gpu
def test_cuda_decode_matches_shape(tmp_path):
    (images, targets, bad), _ = run(tmp_path, "cuda", True)
    assert images.is_cuda and targets.is_cuda and len(bad) == 1


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_trainer_with_gpu_decode_flag_learns(tmp_path, monkeypatch, device):
    """--gpu-decode runs the whole training loop through the decode path (on the CPU fallback
    without CUDA). The CPU run reaches 100%: a pipeline that pairs images with the wrong
    labels stays near chance (33%), one that tells only two classes apart at 67% at most."""
    from test_cls_data import make_image_folder
    from test_cls_train import CHANCE, records, tiny_args, tiny_cfg

    from classification import trainer

    calls = []
    decode = GpuDecoder.__call__
    monkeypatch.setattr(GpuDecoder, "__call__", lambda self, b: calls.append(1) or decode(self, b))
    data = str(tmp_path / "data")
    n_val = make_image_folder(data)
    out = str(tmp_path / "run")
    cfg = tiny_cfg(*tiny_args(data, out, epochs=2, extra=["--gpu-decode", "--device", device]))
    assert cfg["data"]["gpu_decode"] is True
    result = trainer.main(cfg)
    assert result["top1"] > CHANCE + 40 and result["count"] == n_val, result
    assert len(calls) == 2 * 12  # every training batch went through the decoder (98 // 8)
    # The corrupt JPEG and the truncated PNG are dropped and counted by the decoder.
    assert [r["skipped_train_images"] for r in records(out, "eval")] == [2, 4]
