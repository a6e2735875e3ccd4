"""Width matching for the node-operation ablation (RandWire Figure 6).

Swapping the 3x3 separable conv for a regular 3x3 conv or pool + 1x1 conv changes FLOPs a lot;
the paper compares node ops at (roughly) equal complexity, so C is re-chosen per op such that the
network's FLOPs stay nearest to the separable-conv network's.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from rwdet.graphs import graphs_fingerprint

_PROBE_SIZE = 64  # FLOPs of these fully-convolutional nets scale with the input area


def conv_fc_macs(model: nn.Module, size: int) -> int:
    """Multiply-adds of convs and FCs (fvcore's convention), from shapes alone.

    Runs on the ``meta`` device, so it costs no arithmetic: fast enough to call in a search.
    """
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total[0] += out.numel() * k
        else:
            total[0] += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total[0]


_MATCHED: dict[tuple, int] = {}  # searches are slow (dozens of meta-device builds): memoised


def matched_channels(regime: str, channels: int, nodes: int, node_op: str, **graph_kwargs) -> int:
    """The C for ``node_op`` whose FLOPs are nearest to the sepconv network with ``channels``.

    ``graph_kwargs`` (``gen``, ``gen_params``, ``seed`` or ``graphs``) are the model's own:
    the count follows its graphs, not a default generator's.
    """
    graphs = graph_kwargs.get("graphs")
    key = (
        regime, channels, nodes, node_op, graph_kwargs.get("gen"), graph_kwargs.get("seed"),
        json.dumps(graph_kwargs.get("gen_params"), sort_keys=True),
        graphs_fingerprint(graphs) if graphs else None,
    )  # fmt: skip
    if key not in _MATCHED:
        _MATCHED[key] = _search_channels(regime, channels, nodes, node_op, graph_kwargs)
    return _MATCHED[key]


def _search_channels(regime, channels, nodes, node_op, graph_kwargs) -> int:
    from rwdet.models.randwire import RandWire

    def flops(c: int, op: str) -> int:
        with torch.device("meta"):
            model = RandWire(regime=regime, channels=c, nodes=nodes, node_op=op, **graph_kwargs)
        return conv_fc_macs(model, _PROBE_SIZE)

    if node_op == "sepconv":
        return channels
    target = flops(channels, "sepconv")
    lo, hi = 2, channels
    while flops(hi, node_op) < target:  # pool + 1x1 can be cheaper than sepconv: widen
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if flops(mid, node_op) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda c: abs(flops(c, node_op) - target))
