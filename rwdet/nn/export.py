"""Freeze a DNW or edge-popup model into the plain network it found, for inference.

``export_subnetwork(model)`` returns a copy in which

- every ``PopupConv2d``/``DNWConv2d``/``SupermaskConv2d`` (and their linear layers) is a plain
  ``nn.Conv2d`` (``nn.Linear``) holding ``weight * mask`` (a supermask's evaluation mask):
  unkept weights are zeros, nothing is chosen any more and no score remains;
- every ``GraphStage`` with learned gates is rebuilt from its real edges: dead nodes (no real
  path to the stage output) and their edges are removed, the gates become ``FixedGates``
  holding the learned gate values, and nodes are renumbered in the same order;
- a MobileNetV1-DNW's neural graphs lose their dead channels (``MobileNetV1DNW.export_pruned``).

Outputs are the same as the source model's in eval mode (dropping a ``0 * x`` term from a sum
is exact; dropping channels from a matmul may change float summation order only).

One detail keeps node-level stages exact: a live node whose real in-edges were all dropped
aggregates zeros in the source model. In the exported graph it keeps one zero-valued edge from
node 0 (every stage's first source), so it is not mistaken for a source reading the stage input.

The result is for inference and analysis (``rwdet.complexity.sparse`` counts it the same as its
source); keep the trained checkpoint and export at load time — exporting is deterministic.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.learned_gates import LEARNED_GATES, FixedGates
from rwdet.nn.sparse_layers import (
    DNWConv2d,
    DNWLinear,
    PopupConv2d,
    PopupLinear,
    SupermaskConv2d,
    SupermaskLinear,
)
from rwdet.nn.stage import GraphStage


def stage_live_nodes(stage: GraphStage) -> list[bool]:
    """``live[v]``: node v has a path of real edges to a stage output (a candidate sink).

    Any other node is dead: its output is never used, so it does no work at inference."""
    n = len(stage.nodes)
    children: list[list[int]] = [[] for _ in range(n)]
    for u, v in stage.gates.active_edges():
        children[u].append(v)
    live = [False] * n
    sinks = set(stage.sinks)
    for v in range(n - 1, -1, -1):
        live[v] = v in sinks or any(live[c] for c in children[v])
    return live


@torch.no_grad()
def prune_stage(stage: GraphStage) -> GraphStage:
    """The real-edge, live-node form of a stage with learned gates (same outputs)."""
    gates = stage.gates
    values = gates().detach().float()
    real = gates.active_edges()
    live = stage_live_nodes(stage)
    has_real_parent = {v for _, v in real}
    orphans = [
        v for v in range(len(live)) if live[v] and stage.in_edges[v] and v not in has_real_parent
    ]
    keep = [v for v in range(len(live)) if live[v] or (v == 0 and orphans)]
    index = {v: i for i, v in enumerate(keep)}
    value_of = dict(zip(gates.edges, values.tolist()))
    edges = {(index[u], index[v]): value_of[(u, v)] for u, v in real if live[v]}
    edges.update({(index[0], index[o]): 0.0 for o in orphans})
    spec = GraphSpec(n=len(keep), edges=tuple(edges), gen="exported")
    # The node ops are copied from the source stage, so build the cheapest placeholder ops.
    new = GraphStage(
        spec,
        stage.in_channels,
        stage.out_channels,
        stage.stride,
        node_op="maxpool",
        gates=FixedGates(spec.edges, torch.tensor([edges[e] for e in spec.edges])),
    )
    new.nodes = nn.ModuleList(copy.deepcopy(stage.nodes[v]) for v in keep)
    new.execution, new.name = stage.execution, stage.name
    new.to(stage.in_edge_index.device)  # the gate values and edge index, built on the CPU
    if [keep[s] for s in new.sinks] != list(stage.sinks):
        raise RuntimeError("exported stage changed the stage outputs; please report this bug")
    return new


def _plain_conv(m: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
    new.weight.data.copy_(m.masked_weight().detach())
    if m.bias is not None:
        new.bias.data.copy_(m.bias.detach())
    return new


def _plain_linear(m: nn.Module) -> nn.Linear:
    bias = getattr(m, "bias", None)
    new = nn.Linear(
        m.in_features,
        m.out_features,
        bias=bias is not None,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
    new.weight.data.copy_(m.masked_weight().detach())
    if bias is not None:
        new.bias.data.copy_(bias.detach())
    return new


def _replace(model: nn.Module, fn) -> nn.Module:
    """``model`` with every module ``m`` for which ``fn(m)`` is not None replaced by it (the
    root included: the model may itself be a stage or a sparse layer)."""
    root = fn(model)
    if root is not None:
        return root
    for name, module in list(model.named_modules())[1:]:
        new = fn(module)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


@torch.no_grad()
def export_subnetwork(model: nn.Module) -> nn.Module:
    """A plain, frozen copy of ``model``'s found subnetwork (module docstring)."""
    was_training = model.training
    if hasattr(model, "export_pruned"):
        new = model.export_pruned()
    else:
        new = copy.deepcopy(model)
    new = _replace(
        new,
        lambda m: (
            prune_stage(m)
            if isinstance(m, GraphStage) and isinstance(m.gates, LEARNED_GATES)
            else None
        ),
    )

    def plain(m):
        if isinstance(m, (SupermaskConv2d, SupermaskLinear)):
            if m.eval_mask == "sample":
                raise ValueError(
                    "a supermask layer with eval_mask='sample' draws a new network on every "
                    "evaluation, so there is no one subnetwork to export; build it with "
                    "eval_mask='threshold' (or 'expected')"
                )
            m.eval()  # the evaluation mask, never a training sample
        if isinstance(m, (PopupConv2d, DNWConv2d, SupermaskConv2d)):
            return _plain_conv(m)
        if isinstance(m, (PopupLinear, DNWLinear, SupermaskLinear)):
            return _plain_linear(m)
        return None

    new = _replace(new, plain)
    spec = getattr(model, "rwdet_spec", None)
    if spec is not None:
        # The exported architecture cannot be rebuilt from the source model's spec.
        del new.rwdet_spec
        new.rwdet_exported_from = spec
    new.train(was_training)
    return new


def subnetwork_graphs(model: nn.Module) -> dict[str, GraphSpec]:
    """The real edges of every node-level stage now (the learned wiring), by module path."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GraphStage):
            spec = m.spec
            out[name] = GraphSpec(
                n=spec.n, edges=tuple(m.gates.active_edges()), gen=f"{spec.gen}+learned"
            )
    return out
