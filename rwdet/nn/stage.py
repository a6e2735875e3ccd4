"""The one graph-to-module builder: a stage DAG plus a node op becomes an ``nn.Module``.

RandWire, DNW and edge-popup stages are all ``GraphStage``; they differ only in their gate
module (``rwdet.nn.gates``) and in the conv/norm layer factories handed to the node ops.
"""

from __future__ import annotations

import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.aggregate import exporting, weighted_sum
from rwdet.nn.fused import fusable, fused_stage
from rwdet.nn.gates import EdgeGates, StaticGates
from rwdet.nn.node_ops import build_node_op
from rwdet.nn.recompute import checkpointed, wants_recompute


class GraphStage(nn.Module):
    """One stage: input node -> DAG of node ops -> output node.

    - Nodes with no candidate parents (sources) read the stage input; their op has stride
      ``stride`` and maps ``in_channels`` to ``out_channels``. All other nodes keep
      ``out_channels`` and resolution.
    - A node aggregates its parents' outputs as ``sum gate[e] * Z_parent`` (its parents only,
      never further ancestors), then applies its op; the same output goes to every child.
    - The stage output is the unweighted mean of the sinks.
    - Nodes run in index order (a topological order, since every edge has ``u < v``) and each
      output is released as soon as its last child has consumed it.
    - Training memory: with ``fused=True`` (default) a stage of plain sepconv nodes (BN in
      training mode, or detectron2's FrozenBN) runs as one autograd op that keeps one tensor
      per node for backward (``rwdet.nn.fused``), not four.
      Other node ops, DNW/popup layer types and eval-mode BN run node by node; there
      ``recompute=True`` checkpoints each node (``rwdet.nn.recompute``). Both give the
      reference path's results; ``fused=False, recompute=False`` is that reference.
    - On CPU the fused op and forwards without gradients compute in channels_last and return
      the input's layout (see ``forward``).
    """

    def __init__(
        self,
        spec: GraphSpec,
        in_channels: int,
        out_channels: int,
        stride: int = 2,
        node_op: str = "sepconv",
        gates: EdgeGates | None = None,
        conv_layer=nn.Conv2d,
        norm_layer=nn.BatchNorm2d,
        recompute: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        self.spec = spec
        self.recompute = recompute
        self.fused = fused
        self.gates = gates if gates is not None else StaticGates(spec.edges)
        edges = self.gates.edges
        n = spec.n
        for u, v in edges:
            if not 0 <= u < v < n:
                raise ValueError(f"candidate edge ({u}, {v}) is invalid for a {n}-node stage")
        if len(set(edges)) != len(edges):
            repeated = sorted({e for e in edges if edges.count(e) > 1})
            raise ValueError(
                f"the gates' candidate edges repeat {repeated}; each (u, v) may appear once"
            )
        self.in_edges: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for e, (u, v) in enumerate(edges):
            self.in_edges[v].append((e, u))
        has_child = {u for u, _ in edges}
        self.sources = [v for v in range(n) if not self.in_edges[v]]
        self.sinks = [v for v in range(n) if v not in has_child]
        # last_use[u] = the node after which Z_u is no longer needed (sinks live to the end).
        self.last_use: dict[int, int] = {}
        for u, v in edges:  # gates may list their edges in any order
            self.last_use[u] = max(self.last_use.get(u, v), v)
        for s in self.sinks:
            self.last_use.pop(s, None)
        self.release_after: list[list[int]] = [[] for _ in range(n)]
        for u, v in self.last_use.items():
            self.release_after[v].append(u)
        # first_use[u] = u's smallest-index child: the last to read Z_u in a (reverse) backward.
        self.first_use: dict[int, int] = {}
        for u, v in edges:
            self.first_use[u] = min(self.first_use.get(u, v), v)
        self.nodes = nn.ModuleList(
            build_node_op(
                node_op,
                in_channels if not self.in_edges[v] else out_channels,
                out_channels,
                stride if not self.in_edges[v] else 1,
                conv_layer=conv_layer,
                norm_layer=norm_layer,
            )
            for v in range(n)
        )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        # Each node's in-edge indices, built once (not per step: on a GPU that would be a
        # host-to-device copy per node): node v's are in_edge_index[slices[v][0]:slices[v][1]].
        order = [e for v in range(n) for e, _ in self.in_edges[v]]
        self.register_buffer("in_edge_index", torch.tensor(order, dtype=torch.long), False)
        starts = [0]
        for v in range(n):
            starts.append(starts[-1] + len(self.in_edges[v]))
        self.slices = list(zip(starts[:-1], starts[1:]))

    def _use_fused(self) -> bool:
        # Tracers (torch.compile, jit.trace as in fvcore's FLOP count, jit.script, ONNX
        # export) get the node-by-node path.
        return (
            self.fused
            and self.training
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not exporting()
            and all(fusable(op) for op in self.nodes)
        )

    def aggregate(self, v: int, x: torch.Tensor, outs: dict, gates: torch.Tensor):
        ins = self.in_edges[v]
        if not ins:
            return x
        index = self.in_edge_index[slice(*self.slices[v])]
        if len(ins) == 1 and ins[0][0] in self.gates.unit_edges:
            return outs[ins[0][1]]
        return weighted_sum(gates.index_select(0, index), [outs[u] for _, u in ins])

    def run_node(self, v: int, x: torch.Tensor, gates: torch.Tensor, *parents: torch.Tensor):
        outs = dict(zip((u for _, u in self.in_edges[v]), parents))
        return self.nodes[v](self.aggregate(v, x, outs, gates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On CPU the fused op and forwards without gradients (inference) compute in
        # channels_last whatever the input's layout, and hand that layout back: oneDNN runs 3x3
        # depthwise and 1x1 convs on few channels much faster in NHWC (C=109, batch 16, NCHW
        # model: fused training step -16 to -20%, inference -21%; docs/performance.md).
        # Node-by-node training keeps the caller's layout: there autograd would give NCHW
        # weights gradients with other strides, which DDP's gradient buckets reject (a
        # warning, a copy each step). CUDA keeps the layout.
        # A stage with nothing to differentiate (FREEZE_AT's frozen stages) saves nothing for
        # backward either way; the node path keeps FrozenBN's own no-gradient kernel there.
        fused = self._use_fused() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        cl = torch.channels_last
        if (
            (fused or not torch.is_grad_enabled())
            and x.device.type == "cpu"
            and not exporting()
            and not x.is_contiguous(memory_format=cl)
        ):
            return self._forward(x.contiguous(memory_format=cl), fused).contiguous()
        return self._forward(x, fused)

    def _forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        gates = self.gates()
        if fused:
            return fused_stage(self, x, gates)
        outs: dict[int, torch.Tensor] = {}
        recompute = wants_recompute(self.recompute, self)
        for v, node in enumerate(self.nodes):
            if recompute:
                parents = [outs[u] for _, u in self.in_edges[v]]
                outs[v] = checkpointed(self.run_node, v, x, gates, *parents, module=node)
            else:
                outs[v] = node(self.aggregate(v, x, outs, gates))
            for u in self.release_after[v]:
                del outs[u]
        sinks = self.sinks
        if not sinks:  # only when the graph-damage study has removed the one sink
            return torch.zeros_like(outs[len(self.nodes) - 1])
        out = outs[sinks[0]]
        for s in sinks[1:]:
            out = out + outs[s]
        return out / len(sinks) if len(sinks) > 1 else out
