"""Precise BatchNorm statistics: recompute the running mean/var of the current weights.

BatchNorm's running averages (momentum 0.1) describe the weights of the last few dozen steps.
In long runs the lr is near zero at the end and they agree with the final weights; in short
runs (the CPU demo, tests) they lag behind, and evaluation suffers. Re-estimating them over a
fixed set of training images with the weights frozen (as pycls and Detectron2's PreciseBN
hook do) removes the lag. It is off by default (``train.precise_bn: 0``).

The estimate is pycls's ``compute_precise_bn_stats`` (``pycls/core/net.py``): the mean of the
per-batch means and of the per-batch (Bessel-corrected) variances, then the mean over ranks.
fvcore's ``update_bn_stats`` is not used because it estimates something else: the pinned
version (0.1.5) takes the population variance of all values seen (Wu & Johnson, "Rethinking Batch in
BatchNorm", appendix), which adds the spread between batch means. Tried here, it changed the
evaluated accuracy of short runs (``tests/test_gpu_decode.py``'s CPU run: 94.4% -> 72.2% top-1
on 18 images, identical training), i.e. the trainer's behaviour; it also rebinds the buffers
(DDP's buffer broadcast and ``torch.compile`` hold the old tensors) and asserts when the loader
yields fewer batches than asked (a batch of unreadable images).
"""

from __future__ import annotations

import torch
from torch import nn

from classification.distributed import all_reduce_sum


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches, world: int = 1) -> int:
    """Replace every BN layer's running stats by their average over ``batches``.

    Only the BN layers run in training mode, so dropout and edge drop stay off and the global
    RNG is not consumed. Statistics are averaged over ranks. Returns the number of batches.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    was_training = model.training
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    n = 0
    for images in batches:
        model(images)
        n += 1
    count = all_reduce_sum(torch.tensor([float(n > 0)], device=saved[0][1].device))
    for m, (momentum, mean, var) in zip(bns, saved):
        m.momentum = momentum
        if count.item() < world:  # some rank saw no batch: keep the old statistics
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            continue
        if world > 1:
            m.running_mean.copy_(all_reduce_sum(m.running_mean.clone()) / world)
            m.running_var.copy_(all_reduce_sum(m.running_var.clone()) / world)
    model.train(was_training)
    return n
