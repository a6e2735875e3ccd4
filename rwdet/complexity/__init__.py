"""Complexity of rwdet models: parameters, FLOPs and activations, dense and kept.

- ``complexity(model, input_size, in_channels)``: params, FLOPs (multiply-adds of convolutions
  and fully-connected layers, the papers' convention) and activations of one image. By default
  counted from the shapes of the ops the forward calls (``analytic``), on the ``meta`` device
  where the forward allows; ``method="traced"`` counts with fvcore's JIT trace
  (``traced``), the reference the analytic count is tested against.
- ``sparse_complexity(model, input_size)``: dense vs kept params and FLOPs of DNW, edge-popup
  and supermask models (``sparse``); each layer type reports what it keeps.
- ``matched_width(build, reference, start)``: the width at which ``build(width)`` costs what
  ``reference()`` costs (RandWire Figure 6's node-op ablation; ``width``).

Layering: this package uses ``rwdet.nn`` and nothing above it; models import it.
"""

from __future__ import annotations

import torch
from torch import nn

from rwdet.complexity.analytic import count_ops, count_ops_for_shape, count_params, model_device
from rwdet.complexity.sparse import KeptContext, sparse_complexity
from rwdet.complexity.width import matched_width, meta_flops

METHODS = ("analytic", "traced")

__all__ = [
    "METHODS",
    "KeptContext",
    "complexity",
    "count_ops",
    "count_ops_for_shape",
    "count_params",
    "matched_width",
    "meta_flops",
    "sparse_complexity",
]


@torch.no_grad()
def complexity(
    model: nn.Module, input_size: int = 224, in_channels: int = 3, method: str = "analytic"
) -> dict:
    """Params, FLOPs and activations for one ``in_channels x input_size^2`` image, in eval mode.

    method: "analytic" (default; op shapes, run on the ``meta`` device where the forward
        allows, so no arithmetic) or "traced" (fvcore's FlopCountAnalysis and
        ActivationCountAnalysis; a model with real tensors only). Both give the same numbers
        for every rwdet model but the continuous-time neural graph (its solver's steps).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {METHODS}")
    device = model_device(model)
    if method == "traced" and device.type == "meta":
        raise ValueError("method='traced' runs a real forward; build the model off 'meta'")
    was_training = model.training
    model.eval()
    try:
        shape = (1, in_channels, input_size, input_size)
        if method == "traced":
            from rwdet.complexity.traced import count_activations, count_flops

            x = torch.zeros(shape, device=device)
            flops, activations = count_flops(model, x), count_activations(model, x)
        else:
            counts = count_ops_for_shape(model, shape)
            flops, activations = counts.flops, counts.activations
        return {
            "params": count_params(model),
            "flops": flops,
            "activations": activations,
            "input_size": input_size,
        }
    finally:
        model.train(was_training)
