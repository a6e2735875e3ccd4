"""fvcore's traced count: the reference the analytic count (``analytic``) is checked against.

``FlopCountAnalysis`` / ``ActivationCountAnalysis`` trace one real forward pass with
``torch.jit`` and count each recorded aten op. It is the count the field reports (detectron2,
pycls, timm's tables), so ``tests/test_complexity.py`` holds the analytic count to it for one
model of each family; rwdet's tools use the analytic count, which needs no trace.

The papers' FLOP columns are multiply-adds of convolutions and fully-connected layers (fvcore
counts one fused multiply-add as one flop); fvcore also counts normalisation, upsampling and
pooling by default, which the papers leave out, so those handles are set to zero here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# Ops fvcore counts by default that the papers' FLOP columns leave out.
IGNORED_OPS = (
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
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    # A zero-count handle (not None: fvcore keeps its default handle for ops set to None).
    analysis.set_op_handle(**{op: _zero for op in IGNORED_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():  # fvcore calls the deprecated torch.jit tracing API
        warnings.simplefilter("ignore", FutureWarning)
        return int(analysis.total())


def count_activations(model: nn.Module, inputs: torch.Tensor) -> int:
    from fvcore.nn import ActivationCountAnalysis

    analysis = ActivationCountAnalysis(model, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return int(analysis.total())
