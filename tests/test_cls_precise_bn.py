"""Precise BN (pycls's estimate): the mean of per-batch means and variances, in the model's own
buffers, with only BN in training mode; unchanged when a rank has no batch."""

import torch
from torch import nn

from classification.precise_bn import recompute_bn_stats


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.ReLU())


def _batches(n=4, size=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 2, 3, 3, generator=g) * (1 + i) + i for i in range(n)]


def test_statistics_are_the_mean_of_the_batches_statistics():
    model, data = _model(), _batches()
    bn = model[1]
    mean_ref, var_ref = bn.running_mean, bn.running_var
    model.train()
    rng = torch.get_rng_state()
    assert recompute_bn_stats(model, iter(data[:3])) == 3
    with torch.no_grad():
        xs = [model[0](b) for b in data[:3]]  # the BN's input, batch by batch
    want_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    want_var = torch.stack([x.var(dim=(0, 2, 3)) for x in xs]).mean(0)  # not the pooled var
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, want_var, atol=1e-4)
    # The buffers DDP and torch.compile hold are updated in place, not replaced.
    assert bn.running_mean is mean_ref and bn.running_var is var_ref
    assert bn.momentum == 0.1 and model.training and bn.training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout did not run


def test_no_batch_keeps_the_old_statistics():
    model = _model()
    before = model[1].running_var.clone()
    assert recompute_bn_stats(model, iter([])) == 0
    assert torch.equal(model[1].running_var, before)
    assert recompute_bn_stats(nn.Sequential(nn.Linear(2, 2)), iter(_batches())) == 0
