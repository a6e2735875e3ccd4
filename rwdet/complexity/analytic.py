"""FLOPs and activations from the shapes of the ops a forward pass calls, without tracing.

pycls's ``complexity()`` (Radosavovic et al. 2020) counts from layer shapes alone, which is what
makes it fast; each of its layer classes declares its own count. rwdet cannot rely on layer
classes: MobileNet-DNW's channel-level graphs and DNW's neural graphs compute their pointwise
sums with ``F.conv2d`` on slices of one weight matrix, outside any ``nn.Conv2d``. So the count is
taken one level lower, at the functional API every layer ends in (``F.conv2d``, ``F.linear``,
``matmul`` ...), through a ``TorchFunctionMode`` that sees each call with its tensors' shapes.
On the ``meta`` device those tensors have no storage and no op does any arithmetic: building
and counting RandWire C=154 costs a fraction of a second, where fvcore's traced count (``traced``)
runs two real forward passes and a JIT trace (40 s for ``analyze.py complexity --table``).
There the mode also skips the uncounted ops whose output keeps their input's shape (BN, ReLU,
the aggregation's in-place sums): their meta kernels are Python reference code, slower than the
rest of the count together. A model with real tensors is counted on meta copies of its tensors
(``rwdet.complexity.meta.forward_for_shapes``), or with one real forward where the forward reads
values (an adaptive ODE solver's step size).

The rules are fvcore's own (``fvcore.nn.jit_handles``), so both counts agree op for op
(``tests/test_complexity.py`` checks one model of each family):

- FLOPs: one fused multiply-add is one flop (the papers' "FLOPs = multiply-adds", DNW
  footnote 1, RandWire §4). Convolutions: ``batch * prod(weight.shape) * prod(out.shape[2:])``
  (transposed: the input's spatial size); fully connected and matrix products:
  ``prod(a.shape) * b.shape[-1]``; einsum: numpy's optimal contraction path, halved. Nothing
  else is counted: normalisation, activations, pooling, upsampling and the weighted sums of a
  graph's aggregation cost nothing in the papers' tables (``rwdet.complexity.traced`` sets
  fvcore's handles for those ops to zero).
- activations: output elements of convolutions, fully-connected layers and matrix products
  other than ``mm`` (fvcore's ``ActivationCountAnalysis`` set).

The mode sees the calls made at the Python API; one functional that wraps others (e.g.
``F.multi_head_attention_forward``) is one call, and what it does inside is not seen. No rwdet
model has one; the traced count stays available for such models (``method="traced"``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

T = torch.Tensor


@dataclass
class OpCounts:
    flops: int = 0
    activations: int = 0


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _conv(args, kwargs, out, transposed: bool) -> tuple[int, int]:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    spatial = (_shape(x) if transposed else _shape(out))[2:]
    return x.shape[0] * math.prod(_shape(w)) * math.prod(spatial), out.numel()


def _linear(args, kwargs, out) -> tuple[int, int]:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    return math.prod(_shape(x)) * w.shape[0], out.numel()


def _matmul(a, b, out, activations: bool) -> tuple[int, int]:
    flops = math.prod(_shape(a)) * b.shape[-1]
    return flops, out.numel() if activations else 0


def _einsum(args, kwargs, out) -> tuple[int, int]:
    import numpy as np

    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = equation.replace(" ", "")
    shapes = [_shape(t) for t in operands]
    # fvcore renames the letters in order of appearance, then special-cases two batched
    # products and asks numpy for the rest.
    letters = OrderedDict((c, 0) for c in equation if c.isalpha()).keys()
    equation = equation.translate({ord(c): 97 + i for i, c in enumerate(letters)})
    if equation == "abc,abd->acd":
        n, c, t = shapes[0]
        flops = n * c * t * shapes[-1][-1]
    elif equation == "abc,adc->adb":
        n, t, g = shapes[0]
        flops = n * t * g * shapes[-1][1]
    else:
        path = np.einsum_path(equation, *[np.zeros(s) for s in shapes], optimize="optimal")[1]
        line = next(x for x in path.split("\n") if "optimized flop" in x.lower())
        flops = int(np.floor(float(line.split(":")[-1]) / 2))
    return flops, out.numel()


def _rules() -> dict:
    rules = {}
    for f in (F.conv1d, F.conv2d, F.conv3d):
        rules[f] = lambda a, k, o: _conv(a, k, o, transposed=False)
    for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        rules[f] = lambda a, k, o: _conv(a, k, o, transposed=True)
    rules[F.linear] = _linear
    for f in (torch.matmul, T.matmul, T.__matmul__):
        rules[f] = lambda a, k, o: _matmul(a[0], a[1], o, activations=True)
    rules[T.__rmatmul__] = lambda a, k, o: _matmul(a[1], a[0], o, activations=True)
    for f in (torch.mm, T.mm):
        rules[f] = lambda a, k, o: _matmul(a[0], a[1], o, activations=False)
    for f in (torch.bmm, T.bmm):
        rules[f] = lambda a, k, o: _matmul(a[0], a[1], o, activations=True)
    for f in (torch.addmm, T.addmm):  # addmm(bias, a, b)
        rules[f] = lambda a, k, o: _matmul(a[1], a[2], o, activations=True)
    rules[torch.einsum] = _einsum
    return rules


_RULES = _rules()

# Uncounted ops whose output has the shape of their first argument: on the meta device they are
# not run (their meta kernels are Python reference code, ~1 ms a call, most of a RandWire
# count). "new": a fresh tensor like the input; "self": in place, the input itself.
_SHAPE_KEEPING = {
    F.batch_norm: "new", torch.batch_norm: "new", torch.relu: "new", T.relu: "new",
    torch.relu_: "self", T.relu_: "self", T.addcmul_: "self", T.add_: "self", T.mul_: "self",
}  # fmt: skip


def _skip_on_meta(func, args, kwargs):
    """The output of an uncounted shape-keeping op on a meta tensor, or None to run it."""
    x = args[0] if args else None
    if not isinstance(x, T) or not x.is_meta:
        return None
    if func is F.relu:  # F.relu(x, inplace=...)
        kind = "self" if kwargs.get("inplace", len(args) > 1 and args[1]) else "new"
    elif func in (torch.mul, T.mul) and len(args) == 2 and _scalar(args[1]):
        return torch.empty_like(x, dtype=torch.result_type(x, args[1]))  # e.g. Z_u * gate
    else:
        kind = _SHAPE_KEEPING.get(func)
    if kind is None:
        return None
    return x if kind == "self" else torch.empty_like(x)


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, T) and value.dim() == 0)


class OpCounter(TorchFunctionMode):
    """Adds up FLOPs and activations of the counted calls made while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = OpCounts()

    def reset(self) -> None:
        self.counts = OpCounts()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        skipped = _skip_on_meta(func, args, kwargs)
        if skipped is not None:
            return skipped
        out = func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is not None:
            flops, activations = rule(args, kwargs, out)
            self.counts.flops += int(flops)
            self.counts.activations += int(activations)
        return out


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (``meta`` for a model built under ``torch.device("meta")``)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def count_ops(model: nn.Module, inputs: torch.Tensor) -> OpCounts:
    """FLOPs and activations of ``model(inputs)``, as the model is (train or eval mode)."""
    with OpCounter() as counter:
        model(inputs)
    return counter.counts


@torch.no_grad()
def count_ops_for_shape(model: nn.Module, shape: tuple[int, ...]) -> OpCounts:
    """``count_ops`` on zeros of ``shape``, on the meta device where the forward allows
    (``rwdet.complexity.meta.forward_for_shapes``)."""
    from rwdet.complexity.meta import forward_for_shapes

    with OpCounter() as counter:
        forward_for_shapes(model, shape, counter.reset)
    return counter.counts


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or not (edge-popup keeps its fixed weights as parameters)."""
    return sum(p.numel() for p in model.parameters())
