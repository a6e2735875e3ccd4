"""Analytic complexity of rwdet models: parameters, FLOPs and activations, counted by fvcore.

FLOPs follow the papers' convention: multiply-adds of convolutions and fully-connected layers
(fvcore counts one fused multiply-add as one flop). Normalisation, activation, pooling and the
(tiny) weighted sums of the aggregation are not counted, as in the papers' tables.
"""

from __future__ import annotations

import torch
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
from torch import nn

# Ops fvcore counts by default that the papers' FLOP columns leave out.
_IGNORED = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def _zero(inputs, outputs) -> int:
    return 0


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    analysis = FlopCountAnalysis(model, inputs)
    # A zero-count handle (not None: fvcore keeps its default handle for ops set to None).
    analysis.set_op_handle(**{op: _zero for op in _IGNORED})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


def count_activations(model: nn.Module, inputs: torch.Tensor) -> int:
    analysis = ActivationCountAnalysis(model, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or not (edge-popup keeps its fixed weights as parameters)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def complexity(model: nn.Module, input_size: int = 224, in_channels: int = 3) -> dict:
    """Params, FLOPs and activations for one ``in_channels x input_size^2`` image, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_channels, input_size, input_size)
        return {
            "params": count_params(model),
            "flops": count_flops(model, x),
            "activations": count_activations(model, x),
            "input_size": input_size,
        }
    finally:
        model.train(was_training)
