"""Node transformations (RandWire Figure 2): what one graph node computes after aggregation.

Every op maps ``(in_channels, out_channels, stride)`` to a module and builds its convolutions and
norms through ``conv_layer`` / ``norm_layer`` factories, so a wiring mode (edge-popup's
``SubnetConv``, DNW's masked layers) or a detection norm (FrozenBN, GN) swaps in without
touching the op. The ablation ops of Figure 6 live here too.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ConvLayer = Callable[..., nn.Module]
NormLayer = Callable[[int], nn.Module]


class SepConvOp(nn.Sequential):
    """ReLU -> 3x3 depthwise -> 1x1 pointwise -> BN (nothing between the two convs, paper fn. 5).

    The fused stage op (``rwdet.nn.fused``) runs these same layers, in this order, and applies
    the norm through BatchNorm's own kernel, to keep the batch statistics for its backward."""

    def __init__(self, cin, cout, stride, conv_layer: ConvLayer, norm_layer: NormLayer):
        super().__init__(
            nn.ReLU(),
            conv_layer(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            conv_layer(cin, cout, 1, bias=False),
            norm_layer(cout),
        )


class ConvOp(nn.Sequential):
    """ReLU -> 3x3 regular conv -> BN (Figure 6 ablation)."""

    def __init__(self, cin, cout, stride, conv_layer: ConvLayer, norm_layer: NormLayer):
        super().__init__(
            nn.ReLU(),
            conv_layer(cin, cout, 3, stride=stride, padding=1, bias=False),
            norm_layer(cout),
        )


class PoolConvOp(nn.Sequential):
    """ReLU -> 3x3 max/avg pool -> 1x1 conv -> BN (Figure 6 ablation)."""

    def __init__(self, cin, cout, stride, conv_layer: ConvLayer, norm_layer: NormLayer, pool="max"):
        pool_cls = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
        kwargs = {"count_include_pad": False} if pool == "avg" else {}
        super().__init__(
            nn.ReLU(),
            pool_cls(3, stride=stride, padding=1, **kwargs),
            conv_layer(cin, cout, 1, bias=False),
            norm_layer(cout),
        )


def _pool(kind):
    def build(cin, cout, stride, conv_layer, norm_layer):
        return PoolConvOp(cin, cout, stride, conv_layer, norm_layer, pool=kind)

    return build


NODE_OPS: dict[str, Callable[..., nn.Module]] = {
    "sepconv": SepConvOp,
    "conv": ConvOp,
    "maxpool": _pool("max"),
    "avgpool": _pool("avg"),
}


# The node op classes: all nn.Sequential starting with nn.ReLU, whose last layer (a conv, or a
# norm after one) gives a fresh tensor; ``GraphStage`` relies on both without autograd.
NODE_OP_TYPES = (SepConvOp, ConvOp, PoolConvOp)


def build_node_op(name, cin, cout, stride, conv_layer=nn.Conv2d, norm_layer=nn.BatchNorm2d):
    if name not in NODE_OPS:
        raise ValueError(f"node_op={name!r} is not known; choose one of {sorted(NODE_OPS)}")
    return NODE_OPS[name](cin, cout, stride, conv_layer, norm_layer)
