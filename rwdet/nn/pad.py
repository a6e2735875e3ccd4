"""Zero channels added so every channel count is a multiple of ``multiple``, exactly.

Why: NVIDIA's bf16/fp16 tensor-core convolution kernels want channel counts that are multiples
of 8, and RandWire-C109's widths (54, 109, 218, 436) are not (nor are
C=154's 77, 154 and 308). Whether that costs time on a GPU is a measurement, not a belief:
``pad_channels(model, 8)`` gives a model that computes the same function with padded widths,
so the two can be timed side by side (``benchmarks/train_step.py`` option ``+pad8``,
``make gpu-check``).

The copy has the same layers with every channel count that some convolution produces rounded
up (the network's own input, e.g. 3 image channels, is left alone). The added channels start
at zero everywhere — their conv weights in and out, their BN's weight, bias and running mean —
so their activations are exactly zero, and they stay zero through training: each of their
parameters gets an exactly zero gradient (their inputs are zero, and every node op starts with
a ReLU, whose gradient at zero is zero), so SGD (momentum, weight decay) and Adam(W) never move
them. The real channels compute what the original computes; only the summation order of the
padded convolutions may differ (fp32 rounding; ``tests/test_pad.py``).

Only models built of ``nn.Conv2d``, ``nn.BatchNorm2d`` and ``nn.Linear`` plus layers without
parameters (ReLU, pooling) or with per-edge ones (the graph stages' gates) can be padded;
anything else (FrozenBN, GroupNorm, edge-popup/DNW layers) is refused with its name.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rwdet.nn.gates import EdgeGates
from rwdet.nn.stage import GraphStage


def _up(c: int, multiple: int) -> int:
    return -(-c // multiple) * multiple


def _refuse_unknown(model: nn.Module) -> None:
    plain = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    for name, m in model.named_modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]  # FrozenBN: buffers
        if isinstance(m, (EdgeGates, GraphStage)):  # per edge, whatever the channel count
            continue
        if own and type(m) not in plain:
            raise ValueError(
                f"pad_channels: {name or 'the model'} is a {type(m).__name__}, which it cannot "
                "pad exactly; it pads models of nn.Conv2d, nn.BatchNorm2d and nn.Linear layers "
                "(RandWire and its DNW wiring with BatchNorm)"
            )


def _embed(old: torch.Tensor, shape) -> torch.Tensor:
    """``old`` in the leading corner of a zero tensor of ``shape``."""
    new = old.new_zeros(shape)
    new[tuple(slice(0, s) for s in old.shape)] = old
    return new


def _pad_conv(conv: nn.Conv2d, padded: dict[int, int]) -> None:
    cin, cout = conv.in_channels, conv.out_channels
    new_in, new_out = padded.get(cin, cin), padded[cout]
    depthwise = conv.groups == cin == cout and conv.groups > 1
    if conv.groups > 1 and not depthwise:
        raise ValueError(
            f"pad_channels: a grouped conv ({cin}->{cout}, groups={conv.groups}) is neither "
            "dense nor depthwise; it cannot be padded exactly"
        )
    groups = new_in if depthwise else 1
    shape = (new_out, new_in // groups, *conv.kernel_size)
    conv.weight = nn.Parameter(_embed(conv.weight.data, shape), conv.weight.requires_grad)
    if conv.bias is not None:
        conv.bias = nn.Parameter(_embed(conv.bias.data, (new_out,)), conv.bias.requires_grad)
    conv.in_channels, conv.out_channels, conv.groups = new_in, new_out, groups


def _pad_norm(bn: nn.BatchNorm2d, padded: dict[int, int]) -> None:
    n = padded[bn.num_features]
    for key in ("weight", "bias"):
        p = getattr(bn, key)
        if p is not None:
            setattr(bn, key, nn.Parameter(_embed(p.data, (n,)), p.requires_grad))
    if bn.running_mean is not None:
        bn.running_mean = _embed(bn.running_mean, (n,))
        var = bn.running_var.new_ones(n)
        var[: bn.num_features] = bn.running_var
        bn.running_var = var
    bn.num_features = n


def _pad_linear(fc: nn.Linear, padded: dict[int, int]) -> None:
    new_in = padded[fc.in_features]
    shape = (fc.out_features, new_in)
    fc.weight = nn.Parameter(_embed(fc.weight.data, shape), fc.weight.requires_grad)
    fc.in_features = new_in


@torch.no_grad()
def pad_channels(model: nn.Module, multiple: int = 8) -> nn.Module:
    """A copy of ``model`` whose channel counts are multiples of ``multiple``, the added
    channels exactly zero and kept so (module docstring); ``model`` is not changed."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_channels: multiple={multiple!r}; pass a positive integer, e.g. 8")
    _refuse_unknown(model)
    new = copy.deepcopy(model)
    convs = [m for m in new.modules() if type(m) is nn.Conv2d]
    padded = {c.out_channels: _up(c.out_channels, multiple) for c in convs}
    for conv in convs:
        _pad_conv(conv, padded)
    for m in new.modules():
        if type(m) is nn.BatchNorm2d and m.num_features in padded:
            _pad_norm(m, padded)
        elif type(m) is nn.Linear and m.in_features in padded:
            _pad_linear(m, padded)
    for m in new.modules():  # recorded widths follow (GraphStage.in/out_channels,
        if type(m) is nn.Conv2d:  # RandWire's stage_channels and feature_channels, ...)
            continue
        for key, value in list(m.__dict__.items()):
            if not key.endswith("channels"):
                continue
            if isinstance(value, int) and value in padded:
                setattr(m, key, padded[value])
            elif isinstance(value, dict):
                setattr(m, key, {k: padded.get(c, c) for k, c in value.items()})
    return new
