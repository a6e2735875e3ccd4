"""Trainer behaviours that a recipe relies on, checked through the real trainer and CLI on the
tiny data of test_cls_train: the lr actually set in the optimizer (linear scaling, Goyal's
warmup start), gradient clipping, ``--resume PATH``, ``--no-resume``, and the converter on a
checkpoint the trainer wrote."""

import math
import os
import shutil

import pytest
import torch
from test_cls_train import dataset, records, tiny_args, tiny_cfg  # noqa: F401 (fixture)
from torch.optim.optimizer import register_optimizer_step_pre_hook

from classification import trainer
from classification.checkpoint import load_checkpoint
from rwdet.graphs import graphs_from_dict
from rwdet.models import build_model, stage_outputs

IPE = 13  # iterations per epoch of tiny_args at batch 8 (104 training files)


def run_recording_steps(cfg):
    """Run ``cfg``; return (result, [(lr, global grad norm) at every optimizer step]). The norm
    is taken when the optimizer steps, i.e. after any clipping."""
    steps = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        steps.append((optimizer.param_groups[0]["lr"], norm.item()))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        return trainer.main(cfg), steps
    finally:
        handle.remove()


def cosine_warmup(it, lr, total, warmup, factor):
    """RandWire §4 / Goyal et al.: half-period cosine over all iterations, times a factor rising
    linearly from ``factor`` to 1 over the warmup iterations."""
    value = lr * 0.5 * (1 + math.cos(math.pi * it / total))
    if it < warmup:
        value *= factor + (1 - factor) * it / warmup
    return value


CLIP = 0.05


@pytest.fixture(scope="module")
def big_batch(dataset, tmp_path_factory):  # noqa: F811
    """Global batch 16 against a reference batch of 8, one warmup epoch from Goyal's factor,
    gradients clipped to a norm the tiny model's gradients exceed."""
    data, _ = dataset
    out = str(tmp_path_factory.mktemp("big_batch"))
    extra = ["--batch-size", "16", "--warmup-epochs", "1", "schedule.warmup_factor", "null"]
    cfg = tiny_cfg(*tiny_args(data, out, epochs=2, extra=[*extra, "--clip-grad", str(CLIP)]))
    return (cfg, *run_recording_steps(cfg))


@pytest.mark.parametrize("batch,factor", [(16, 0.5), (4, 1.0)])
def test_lr_follows_linear_scaling_and_goyal_warmup(batch, factor, big_batch, dataset, tmp_path):  # noqa: F811
    """lr = 0.05 x batch / 8 under warmup + cosine. With ``warmup_factor: null`` the warmup
    starts at min(1, reference / global batch) of it: at the reference batch's own lr when the
    batch is larger (Goyal et al.), with no dip when it is smaller."""
    if batch == 16:
        cfg, _, steps = big_batch
    else:
        data, _ = dataset
        extra = ["--batch-size", str(batch), "--warmup-epochs", "1", "schedule.warmup_factor",
                 "null"]  # fmt: skip
        cfg = tiny_cfg(*tiny_args(data, str(tmp_path), epochs=1, extra=extra))
        _, steps = run_recording_steps(cfg)
    ipe = 104 // batch
    epochs = cfg["schedule"]["epochs"]
    lr = 0.05 * batch / 8
    want = [cosine_warmup(it, lr, epochs * ipe, ipe, factor) for it in range(epochs * ipe)]
    assert [s[0] for s in steps] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert steps[0][0] == pytest.approx(0.05 if batch > 8 else lr)
    # The logged lr is the one that was set (a record at iteration i + 1 is step i's).
    logged = [(r["iteration"], r["lr"]) for r in records(cfg["output_dir"], "train")]
    assert logged and all(v == pytest.approx(want[i - 1], rel=1e-9) for i, v in logged)


def test_gradient_clipping_bounds_the_global_norm(big_batch):
    _, _, steps = big_batch
    norms = [s[1] for s in steps]
    assert len(norms) == 2 * 6 and max(norms) <= CLIP * (1 + 1e-4), norms
    # Not vacuous: the raw gradients exceed the bound, so most steps were cut to exactly it.
    assert sum(n == pytest.approx(CLIP, rel=1e-4) for n in norms) >= len(norms) // 2, norms


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):  # noqa: F811
    """A finished 2-epoch run with an EMA: the starting point of the resume tests."""
    data, _ = dataset
    out = str(tmp_path_factory.mktemp("finished"))
    trainer.main(tiny_cfg(*tiny_args(data, out, epochs=2, extra=["--ema"])))
    return out


def file_bytes(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def assert_same_weights(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


@pytest.mark.slow
def test_resume_from_a_path_into_another_folder(finished, dataset, tmp_path):  # noqa: F811
    """``--resume PATH`` continues that run in a new folder, exactly as an auto-resume of the
    run's own folder would, and leaves the source run untouched."""
    data, _ = dataset
    src = os.path.join(finished, "last.pth")
    src_files = {n: file_bytes(finished, n) for n in ("last.pth", "best.pth", "metrics.jsonl")}
    out = str(tmp_path / "new")
    trainer.main(tiny_cfg(*tiny_args(data, out, epochs=3, extra=["--ema", "--resume", src])))
    assert {n: file_bytes(finished, n) for n in src_files} == src_files
    assert not os.path.exists(os.path.join(out, "previous"))
    log = file_bytes(out, "log.txt").decode()
    assert f"resumed from {src} at epoch 2, iteration {2 * IPE}" in log
    train = [r["iteration"] for r in records(out, "train")]
    assert train and min(train) > 2 * IPE and max(train) == 3 * IPE  # only epoch 3 trained
    assert [r["epoch"] for r in records(out, "eval")] == [3]
    # The same continuation by auto-resume in a copy of the source folder: identical weights.
    auto = str(tmp_path / "auto")
    shutil.copytree(finished, auto)
    trainer.main(tiny_cfg(*tiny_args(data, auto, epochs=3, extra=["--ema"])))
    a, b = load_checkpoint(os.path.join(out, "last.pth")), load_checkpoint(auto + "/last.pth")
    assert a["iteration"] == b["iteration"] == 3 * IPE
    assert_same_weights(a, b)


@pytest.mark.slow
def test_no_resume_trains_from_scratch_and_keeps_the_previous_run(finished, dataset, tmp_path):  # noqa: F811
    data, _ = dataset
    out = str(tmp_path / "again")
    shutil.copytree(finished, out)
    old = {n: file_bytes(finished, n) for n in ("last.pth", "best.pth", "metrics.jsonl")}
    trainer.main(tiny_cfg(*tiny_args(data, out, epochs=1, extra=["--ema", "--no-resume"])))
    (stamp,) = os.listdir(os.path.join(out, "previous"))
    kept = os.path.join(out, "previous", stamp)
    assert {n: file_bytes(kept, n) for n in old} == old  # moved aside, byte for byte
    assert min(r["iteration"] for r in records(out, "train")) == 2  # the first log period
    assert [r["epoch"] for r in records(out, "eval")] == [1]
    # From scratch: the same weights as the same command in an empty folder.
    fresh = str(tmp_path / "fresh")
    trainer.main(tiny_cfg(*tiny_args(data, fresh, epochs=1, extra=["--ema"])))
    a, b = load_checkpoint(os.path.join(out, "last.pth")), load_checkpoint(fresh + "/last.pth")
    assert a["iteration"] == b["iteration"] == IPE
    assert_same_weights(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["model", "ema"])
def test_converter_on_a_checkpoint_the_trainer_wrote(finished, weights, tmp_path):
    """The detection backbone built from the converted file computes what the trained weights
    compute (the 32 px stem is adapted to the ImageNet stem, as for the demo)."""
    from test_d2_convert import backbone_keys, convert_main, det_cfg, load_detector

    src, out = os.path.join(finished, "last.pth"), str(tmp_path / "det.pkl")
    ckpt = load_checkpoint(src)
    assert convert_main([src, out, "--ema"] if weights == "ema" else [src, out]) == 0
    det, incompatible = load_detector(det_cfg(out))
    assert backbone_keys(incompatible.missing_keys + incompatible.unexpected_keys) == []
    kwargs = {**ckpt["model_spec"]["kwargs"], "stem": "imagenet"}
    ref = build_model(ckpt["model_spec"]["name"], graphs=graphs_from_dict(ckpt["graphs"]), **kwargs)
    ref.load_state_dict(ckpt[weights])
    other = "ema" if weights == "model" else "model"
    assert any(not torch.equal(ckpt[weights][k], ckpt[other][k]) for k in ckpt[weights])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = stage_outputs(ref.eval(), x)
        got = det.backbone.bottom_up(x)
    for k in ("conv2", "conv3", "conv4", "conv5"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_weights_start_training_from_a_checkpoint(finished, dataset, tmp_path, capsys):  # noqa: F811
    """--weights without --eval-only fine-tunes (it was silently ignored): the first step starts
    from the checkpoint's weights; another class count re-initialises only the classifier
    (refused with --weights-strict); other graphs or a training state are not taken."""
    from test_cls_config import load_tool
    from test_cls_data import make_image_folder

    weights = os.path.join(finished, "best.pth")
    source = load_checkpoint(weights)["model"]
    data, _ = dataset
    seen = {}

    def first_step(optimizer, args, kwargs):  # the model's weights before the first update
        if not seen:
            seen["w"] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    out = str(tmp_path / "tuned")
    handle = register_optimizer_step_pre_hook(first_step)
    try:
        trainer.main(tiny_cfg(*tiny_args(data, out, epochs=1, extra=["--weights", weights])))
    finally:
        handle.remove()
    params = [v for k, v in source.items() if "running" not in k and "num_batches" not in k]
    assert len(seen["w"]) == len(params)
    assert all(torch.equal(a, b) for a, b in zip(seen["w"], params))
    tuned = load_checkpoint(os.path.join(out, "last.pth"))
    assert tuned["iteration"] == IPE  # one epoch of its own, not the source's 2 epochs

    two = str(tmp_path / "two_classes")
    make_image_folder(two, classes=2, train_per_class=8, val_per_class=2, bad=False)
    base = [*tiny_args(two, str(tmp_path / "ft2"), epochs=1), "train.precise_bn", "0"]
    tool = load_tool()
    assert tool.main([*base, "--weights", weights]) == 0
    log = open(os.path.join(tmp_path, "ft2", "log.txt")).read()
    assert "freshly initialised: fc" in log
    capsys.readouterr()
    strict = str(tmp_path / "ft3")
    assert tool.main([*base, "--weights", weights, "--weights-strict", "--output-dir", strict]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "fc." in err and err.count("\n") == 1
    other_seed = [*tiny_args(data, str(tmp_path / "ft4"), epochs=1), "--seed", "2"]
    assert tool.main([*other_seed, "--weights", weights]) == 2
    assert "pass the generator, parameters and seed" in capsys.readouterr().err
