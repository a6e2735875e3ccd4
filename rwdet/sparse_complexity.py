"""Complexity of DNW and edge-popup models: dense vs kept parameters and FLOPs.

``sparse_complexity(model, input_size)`` counts, for one image, in eval mode:

- ``params_dense``: every weight of the network the search runs on — all candidate edges,
  all popup fixed weights, every node op — plus BN affine parameters and biases (learned or
  not). Popup and supermask scores are bookkeeping of the search, not part of the network: reported
  apart as ``score_params``.
- ``params_kept``: only what the found network keeps: chosen weights/edges into live nodes,
  and the ops of live nodes. Ordinary dense layers count their non-zero weights (so an exported
  model with zeroed weights counts the same as the model it came from). A Zhou et al.
  supermask layer keeps what its evaluation mask keeps (``p > 0.5`` by default).
- ``flops_dense`` / ``flops``: multiply-adds of convolutions, fully-connected layers and
  channel-level graph edges (DNW's footnote 1: FLOPs = multiply-adds), dense vs kept. A dead
  node — no real path to the stage output — does no work at inference and is skipped (DNW
  §2.4: "neurons often die ... we may then skip the depthwise convolution"). As in
  ``rwdet.complexity``, normalisation, activations, pooling and the node-level aggregation
  sums are not counted; for a dense model ``flops == flops_dense ==`` fvcore's count.

DNW Table 1's neural graphs (``rwdet.models.neural_graph``) count themselves
(``TimedNeuralGraph.sparse_counts``): per evaluation of ``f`` as above, times the evaluations
of one forward (static 1, discrete L, continuous the mean NFE so far), reported as
``evaluations``.

A node that lost all real in-edges but still feeds the output is *not* dead: it runs its op on
zeros (its output is a learned constant map), so it is counted.
"""

from __future__ import annotations

import torch
from torch import nn

from rwdet.models.mobilenet_dnw import NeuralGraph
from rwdet.models.neural_graph import TimedNeuralGraph
from rwdet.nn.export import stage_live_nodes
from rwdet.nn.learned_gates import DNWGates, FixedGates, PopupGates
from rwdet.nn.sparse_layers import MASKED_LAYERS, PopupLinear, SupermaskLinear
from rwdet.nn.stage import GraphStage


def _weight_counts(m: nn.Module, used: torch.Tensor | None) -> tuple[int, int]:
    """(dense, kept) weights of a conv / linear layer. ``used``: the output channels (conv) or
    input features (linear) that matter downstream; weights elsewhere do no work."""
    if isinstance(m, MASKED_LAYERS):
        kept = m.kept_mask()
    else:
        kept = m.weight != 0
    if used is not None:
        used = used.to(kept.device)
        kept = kept[used] if isinstance(m, nn.Conv2d) else kept[:, used]
    return m.weight.numel(), int(kept.sum())


@torch.no_grad()
def sparse_complexity(model: nn.Module, input_size: int = 224, in_channels: int = 3) -> dict:
    """Dense/kept params and FLOPs of one ``in_channels x input_size^2`` image (module doc)."""
    out_shapes: dict[nn.Module, torch.Size] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, o: out_shapes.__setitem__(mod, o.shape))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, NeuralGraph))
    ]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, in_channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    liveness = model.sparse_liveness() if hasattr(model, "sparse_liveness") else {}
    dead: set[int] = set()  # ids of modules inside dead nodes
    nodes = dead_nodes = 0
    for stage in (m for m in model.modules() if isinstance(m, GraphStage)):
        live = stage_live_nodes(stage)
        nodes += len(live)
        for v, ok in enumerate(live):
            if not ok:
                dead_nodes += 1
                dead.update(id(m) for m in stage.nodes[v].modules())

    r = dict(params_dense=0, params_kept=0, flops_dense=0, flops=0, score_params=0)
    skip_inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_inside):
            continue
        is_dead = id(m) in dead
        if isinstance(m, NeuralGraph):
            skip_inside.append(name)
            c = _graph_counts(m, out_shapes[m], liveness.get(name))
            nodes += c.pop("nodes")
            dead_nodes += c.pop("dead_nodes")
        elif isinstance(m, TimedNeuralGraph):  # DNW Table 1: x evaluations of f (L, NFE)
            skip_inside.append(name)
            c = m.sparse_counts()
            nodes += c.pop("nodes")
            dead_nodes += c.pop("dead_nodes")
            r["evaluations"] = c.pop("evaluations")
        elif isinstance(m, (nn.Conv2d, nn.Linear, PopupLinear, SupermaskLinear)):
            used = liveness.get(name)
            dense_w, kept_w = _weight_counts(m, used)
            bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
            if isinstance(m, nn.Conv2d):
                hw = out_shapes[m][-1] * out_shapes[m][-2] if m in out_shapes else 0
                if used is not None:  # only the used output channels are computed
                    bias = bias * int(used.sum()) // max(1, m.out_channels)
            else:
                hw = 1
            c = dict(
                params_dense=dense_w + bias,
                params_kept=kept_w + bias,
                flops_dense=dense_w * hw,
                flops=kept_w * hw,
            )
        elif isinstance(m, (DNWGates, PopupGates)):
            stage_edges = set(_owner_stage(model, m).gates.active_edges())
            live = stage_live_nodes(_owner_stage(model, m))
            kept = sum(1 for u, v in stage_edges if live[v])
            c = dict(params_dense=len(m.edges), params_kept=kept, flops_dense=0, flops=0)
        elif isinstance(m, FixedGates):
            kept = len(m.active_edges())
            c = dict(params_dense=kept, params_kept=kept, flops_dense=0, flops=0)
        else:
            own = [p for p in m.parameters(recurse=False) if p is not None]
            dense = sum(p.numel() for p in own)
            kept = dense
            if name in liveness:  # per-channel parameters (BN) of used channels only
                kept = sum(p[liveness[name].to(p.device)].numel() for p in own)
            c = dict(params_dense=dense, params_kept=kept, flops_dense=0, flops=0)
        if hasattr(m, "scores") and isinstance(m.scores, nn.Parameter):
            r["score_params"] += m.scores.numel()
        if is_dead:
            c["params_kept"] = c["flops"] = 0
        for key, value in c.items():
            r[key] += int(value)
    r.update(input_size=input_size, nodes=nodes, dead_nodes=dead_nodes)
    return r


def _owner_stage(model: nn.Module, gates: nn.Module) -> GraphStage:
    for m in model.modules():
        if isinstance(m, GraphStage) and m.gates is gates:
            return m
    raise ValueError("gate module is not inside a GraphStage of this model")


def _graph_counts(g: NeuralGraph, shape: torch.Size, needed_out) -> dict:
    hw = int(shape[-1] * shape[-2])
    mask = g.kept_mask()
    src_live, dst_needed = g.live_nodes(needed_out, mask)
    kept_edges = int((mask & dst_needed[:, None]).sum())
    n_src = src_live.numel()
    per_node_params = 2 + 9  # BN (gamma, beta) + 3x3 depthwise kernel
    live = int(src_live.sum())
    dense_edges = int(g.allowed.sum())
    return dict(
        params_dense=dense_edges + per_node_params * n_src,
        params_kept=kept_edges + per_node_params * live,
        flops_dense=(dense_edges + 9 * n_src) * hw,
        flops=(kept_edges + 9 * live) * hw,
        nodes=n_src,
        dead_nodes=n_src - live,
    )
