"""The aggregation ``I_v = sum_i g_i * Z_i`` as one autograd op.

Written with ``*`` and ``+`` it costs, per parent, a temporary product in forward and a
multiply plus a full reduction in backward, and autograd keeps the products' graph. Here the
forward accumulates in place into one output (``add_(Z, alpha=g)``), and backward gives
``dL/dZ_i = g_i * dL/dI`` and ``dL/dg_i = <Z_i, dL/dI>`` as a single dot product. Only the
parents' outputs (alive anyway, they are the graph's node outputs) are saved.

Tracers cannot record a Python autograd op (``torch.jit.trace``: "Could not export Python
function call"), so under tracing, scripting and ONNX export (``exporting()``) the sum is
written with out-of-place tensor ops instead: the same kernels, the same numbers.
"""

from __future__ import annotations

import torch


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over all elements without a temporary when both share a dense layout."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    cl = torch.channels_last
    if a.dim() == 4 and a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl):
        return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return (a * b).sum()


def exporting() -> bool:
    """True while ``torch.jit`` traces or scripts, or ``torch.onnx`` exports: then rwdet's
    custom autograd ops take their plain tensor-math path (a tracer records only that)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return torch.onnx.is_in_onnx_export()


def plain_weighted_sum(weights: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``sum weights[i] * inputs[i]`` with traceable out-of-place ops (``accumulate``'s kernels,
    so the same numbers)."""
    w = weights.to(inputs[0].dtype).unbind()
    out = inputs[0] * w[0]
    for z, wi in zip(inputs[1:], w[1:]):
        out = torch.addcmul(out, z, wi)
    return out


def accumulate(inputs, w, into_first: bool = False) -> torch.Tensor:
    """``sum w_i * Z_i`` into one new tensor, or into ``inputs[0]``'s own memory when
    ``into_first`` (the caller's promise that nothing reads it afterwards; the same numbers);
    ``w`` are 0-d tensors (not Python floats: no host-device sync per node on a GPU)."""
    out = inputs[0].mul_(w[0]) if into_first else inputs[0] * w[0]
    for z, wi in zip(inputs[1:], w[1:]):
        out.addcmul_(z, wi)
    return out


class WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        out = accumulate(inputs, weights.detach().to(inputs[0].dtype).unbind())
        ctx.save_for_backward(weights, *inputs)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, *inputs = ctx.saved_tensors
        w = weights.detach().to(grad.dtype).unbind()
        grad_inputs = [grad * wi if ctx.needs_input_grad[i + 1] else None for i, wi in enumerate(w)]
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.stack([_dot(grad, z).to(weights.dtype) for z in inputs])
        return (grad_w, *grad_inputs)


def weighted_sum(weights: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``sum weights[i] * inputs[i]``: the one aggregation of every execution path (the
    reference and recompute paths through ``GraphStage.aggregate`` with autograd, the fused
    op's forward and backward through the same call with gradients off)."""
    if exporting():
        return plain_weighted_sum(weights, inputs)
    if not torch.is_grad_enabled():  # nothing to record: the op's forward alone
        return accumulate(inputs, weights.detach().to(inputs[0].dtype).unbind())
    return WeightedSum.apply(weights, *inputs)
