"""Learning-rate schedule, linear scaling, EMA and accuracy counting."""

import glob
import math
import os

import pytest
import torch
from torch import nn

from classification.builders import build_scheduler
from classification.config import resolve
from classification.ema import ModelEMA
from classification.metrics import topk_hits
from classification.schedule import LrSchedule, scaled_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sched(total=100, warmup=10, factor=0.1, lr=0.4):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return opt, LrSchedule(opt, lr, total, warmup, factor)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 256, 256) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reference_batch"):
        scaled_lr(0.1, 256, 0)


def test_half_period_cosine_with_linear_warmup():
    opt, s = make_sched()
    assert s.step(0) == pytest.approx(0.04)  # warmup starts at factor * lr
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
    # Linear in the iteration during warmup (times the barely-moved cosine).
    mid = 0.4 * 0.5 * (1 + math.cos(math.pi * 5 / 100)) * (0.1 * 0.5 + 0.5)
    assert s.lr_at(5) == pytest.approx(mid)
    assert s.lr_at(50) == pytest.approx(0.2)  # half-way: half the lr
    assert s.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    lrs = [s.lr_at(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warmup


def test_schedule_state_is_the_iteration():
    _, s = make_sched()
    s.step(37)
    _, t = make_sched()
    t.load_state_dict(s.state_dict())
    assert t.iteration == 37 and t.lr_at(37) == s.lr_at(37)


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_factor"):
        make_sched(factor=2.0)
    with pytest.raises(ValueError, match="at least one iteration"):
        make_sched(total=0)


def test_ema_tracks_parameters_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    before = [p.clone() for p in ema.module.parameters()]
    ema.update(model)
    d = min(0.5, 2 / 11)  # the ramp: (1 + n) / (10 + n) after n=1 update
    for b, e, p in zip(before, ema.module.parameters(), model.parameters()):
        assert torch.allclose(e, d * b + (1 - d) * p)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert all(not p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(model, decay=1.0)


def test_topk_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    assert topk_hits(logits, targets).tolist() == [1, 3]  # top-5 is capped at the 3 classes
    logits = torch.eye(8)[[0, 1, 2]] + torch.arange(8) * 0.01
    assert topk_hits(logits, torch.tensor([0, 7, 3])).tolist() == [1, 2]  # 3 is 6th in row 2


# ---------------------------------------------------------------------------- recipes' lr


def _reference_lrs(cfg, ipe, batch):
    """Every iteration's lr as the hand-written schedule computed it before the fvcore port
    (classification/schedule.py's CosineWarmup/MultiStepWarmup and the trainer's arithmetic),
    kept here as the reference the port must reproduce."""
    o, s = cfg["optim"], cfg["schedule"]
    lr = o["lr"] * batch / o["reference_batch"]
    total, warmup = s["epochs"] * ipe, min(round(s["warmup_epochs"] * ipe), s["epochs"] * ipe)
    factor = s["warmup_factor"]
    if factor is None:
        factor = min(1.0, o["reference_batch"] / batch)
    stones = [round(m * ipe) for m in s["milestones"]]
    out = []
    for it in range(total):
        if stones:
            v = lr * s["gamma"] ** sum(it >= m for m in stones)
        else:
            v = lr * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
        if it < warmup:
            alpha = it / warmup
            v *= factor * (1.0 - alpha) + alpha
        out.append(v)
    return out


RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "cls", "*.yaml")))
CASES = [  # (iterations per epoch, global batch, overrides)
    (7, None, []),
    (13, 1024, []),  # warmup_factor null: reference_batch / batch = 0.25 (Goyal et al.)
    (5, 64, ["schedule.warmup_epochs=2.5"]),  # a fractional warmup, a batch below reference
    (9, None, ["schedule.warmup_epochs=0.3", "schedule.warmup_factor=0.2"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ipe{c[0]}-b{c[1]}-{len(c[2])}")
@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_lr_matches_the_reference_every_iteration(path, case):
    ipe, batch, overrides = case
    cfg = resolve(path, None, ["data.root=unused", *overrides])
    batch = batch or cfg["train"]["batch_size"]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt, ipe, batch)
    want = _reference_lrs(cfg, ipe, batch)
    got = [sched.step(it) for it in range(len(want))]
    assert opt.param_groups[0]["lr"] == got[-1]
    for it, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=1e-12, abs=0.0), (it, g, w)


def test_meters_sum_by_name():
    from classification.meters import TrainWindow, mean_values

    w = TrainWindow(torch.device("cpu"))
    w.add_step(torch.tensor(2.0), torch.tensor([3, 4]), 4)
    w.add_step(torch.tensor(float("nan")), torch.tensor([1, 1]), 2)
    w.add(skipped=5)
    s = w.reduced()
    assert (s["top1"], s["top5"], s["images"], s["nonfinite"], s["skipped"]) == (4, 5, 6, 1, 5)
    assert w.reduced("images") == {"images": 6.0}
    assert mean_values({"loss": 3.0, "top1": 3.0, "top5": 6.0, "images": 6.0}) == {
        "loss": 0.5, "top1": 50.0, "top5": 100.0,
    }  # fmt: skip
    w.zero_()
    assert w["images"].item() == 0
