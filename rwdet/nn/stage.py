"""The one graph-to-module builder: a stage DAG plus a node op becomes an ``nn.Module``.

RandWire, DNW and edge-popup stages are all ``GraphStage``; they differ only in their gate
module (``rwdet.nn.gates``) and in the conv/norm layer factories handed to the node ops.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.aggregate import accumulate, weighted_sum
from rwdet.nn.execution import (
    FUSED,
    FUSED_OP,
    REBUILD,
    RECOMPUTE,
    UNRECORDED,
    check_execution,
    fused_obstacle,
    impossible,
    refuse_old_keywords,
    stage_path,
)
from rwdet.nn.fused import fused_stage
from rwdet.nn.gates import EdgeGates, StaticGates
from rwdet.nn.node_ops import NODE_OP_TYPES, build_node_op
from rwdet.nn.recompute import checkpointed


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
    - How a training step runs is ``execution`` (``rwdet.nn.execution``, which chooses and
      logs): ``"reference"`` node by node with plain autograd (the definition),
      ``"recompute"`` each node checkpointed, ``"fused"`` one autograd op keeping one tensor
      per node (plain sepconv stages only; ``rwdet.nn.fused``), ``"rebuild"`` the fused op
      keeping only the stage input (backward reruns the forward), ``"auto"`` (default) fused
      where possible, else reference. Every path computes through ``aggregate``, the node
      ops and ``sink_mean`` below. ``name`` labels the stage in errors and logs.
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
        execution: str = "auto",
        *,
        name: str = "",
        fused=None,
        recompute=None,
    ):
        super().__init__()
        refuse_old_keywords(fused, recompute)
        self.spec = spec
        self.execution = execution
        self.name = name
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
        if execution in FUSED_OP:  # what is already known now is refused now
            obstacle = fused_obstacle(self.nodes)
            if obstacle is not None:
                raise impossible(self, obstacle)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        self._execution = check_execution(value)

    def aggregate(self, v: int, x: torch.Tensor, outs: dict, gates: torch.Tensor):
        """Node ``v``'s input ``I_v = sum gate[e] * Z_parent``: the stage input for a source,
        the parent's output itself over a single unit edge (gate identically 1)."""
        ins = self.in_edges[v]
        if not ins:
            return x
        if self.unit_input(v):
            return outs[ins[0][1]]
        return weighted_sum(self.node_gates(v, gates), [outs[u] for _, u in ins])

    def unit_input(self, v: int) -> bool:
        """Node ``v`` reads one parent over an edge whose gate is identically 1 (no multiply)."""
        ins = self.in_edges[v]
        return len(ins) == 1 and ins[0][0] in self.gates.unit_edges

    def node_gates(self, v: int, gates: torch.Tensor) -> torch.Tensor:
        """Node ``v``'s in-edge gates, in ``in_edges[v]``'s order."""
        return gates.index_select(0, self.in_edge_index[slice(*self.slices[v])])

    def relu_input(self, v: int, x: torch.Tensor, outs: dict, gates: torch.Tensor, shared: dict):
        """``ReLU(I_v)``, where every node op starts, for a forward that autograd does not
        record (inference, the fused op's forward). The same numbers as
        ``ReLU(aggregate(v, ...))`` with fewer memory passes and allocations: the ReLU runs in
        place on the aggregation's own buffer; the first parent's output is aggregated into (or
        ReLU'd) in place when this node is its last reader; and the stage input's ReLU is
        computed once for all sources (kept in ``shared`` until the last source has run).
        In C=109's folded inference the per-node out-of-place ReLU was 13% of the time."""
        ins = self.in_edges[v]
        if not ins:
            a = shared.pop("relu_x", None)
            if a is None:
                a = torch.relu(x)
            if v != self.sources[-1]:
                shared["relu_x"] = a
            return a
        first = outs[ins[0][1]]
        own = self.last_use.get(ins[0][1]) == v  # nothing reads Z_first after this node
        if self.unit_input(v):
            return first.relu_() if own else torch.relu(first)
        w = self.node_gates(v, gates).detach().to(first.dtype).unbind()
        parents = [first] + [outs[u] for _, u in ins[1:]]
        return accumulate(parents, w, into_first=own).relu_()

    def run_node(self, v: int, x: torch.Tensor, gates: torch.Tensor, *parents: torch.Tensor):
        outs = dict(zip((u for _, u in self.in_edges[v]), parents))
        return self.nodes[v](self.aggregate(v, x, outs, gates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On CPU the fused op and forwards autograd does not record (inference, FREEZE_AT's
        # frozen stages) compute in channels_last whatever the input's layout, and hand that
        # layout back: oneDNN runs 3x3 depthwise and 1x1 convs on few channels much faster in
        # NHWC (C=109, batch 16, NCHW model: fused training step -16 to -20%, inference -21%;
        # docs/performance.md). Node-by-node training keeps the caller's layout: there autograd
        # would give NCHW weights gradients with other strides, which DDP's gradient buckets
        # reject (a warning, a copy each step). CUDA keeps the layout.
        path = stage_path(self, x)
        cl = torch.channels_last
        if (
            path in (FUSED, REBUILD, UNRECORDED)
            and x.device.type == "cpu"
            and not x.is_contiguous(memory_format=cl)
        ):
            return self._forward(x.contiguous(memory_format=cl), path).contiguous()
        return self._forward(x, path)

    def _forward(self, x: torch.Tensor, path: str) -> torch.Tensor:
        gates = self.gates()
        if path in FUSED_OP:
            return fused_stage(self, x, gates, rebuild=path == REBUILD)
        if path == UNRECORDED:
            return self._forward_unrecorded(x, gates)
        outs: dict[int, torch.Tensor] = {}
        for v, node in enumerate(self.nodes):
            if path == RECOMPUTE:
                parents = [outs[u] for _, u in self.in_edges[v]]
                outs[v] = checkpointed(self.run_node, v, x, gates, *parents, module=node)
            else:
                outs[v] = node(self.aggregate(v, x, outs, gates))
            for u in self.release_after[v]:
                del outs[u]
        return self.sink_mean(outs)

    def _forward_unrecorded(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Node by node like the reference, with each node's ReLU input from ``relu_input``
        (in place where nothing else reads). A node op that is not one of rwdet's own ReLU-first
        ops runs whole on ``aggregate``'s output instead, and so does every node when a hook
        could keep a node's output, which ``relu_input`` may later write into."""
        outs: dict[int, torch.Tensor] = {}
        shared: dict[str, torch.Tensor] = {}
        in_place = not _any_hook(self.nodes)
        for v, node in enumerate(self.nodes):
            if in_place and _relu_first(node):
                h = self.relu_input(v, x, outs, gates, shared)
                for layer in islice(node, 1, None):
                    h = layer(h)
                outs[v] = h
            else:
                outs[v] = node(self.aggregate(v, x, outs, gates))
            for u in self.release_after[v]:
                del outs[u]
        return self.sink_mean(outs)

    def sink_mean(self, outs: dict[int, torch.Tensor]) -> torch.Tensor:
        """The stage output: the unweighted mean of the sinks, summed in index order (every
        path; in place on its own sum only, which autograd allows)."""
        sinks = self.sinks
        if not sinks:  # only when the graph-damage study has removed the one sink
            return torch.zeros_like(outs[len(self.nodes) - 1])
        out = outs[sinks[0]]
        if len(sinks) == 1:
            return out
        out = out + outs[sinks[1]]
        for s in sinks[2:]:
            out.add_(outs[s])
        return out.div_(len(sinks))


def _any_hook(nodes: nn.Module) -> bool:
    """A forward hook on any node op or layer in it, or a global one: it could keep a tensor
    (or expect the node op's own ``forward``) that the in-place path would change."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in nodes.modules())


def _relu_first(node: nn.Module) -> bool:
    """One of rwdet's node ops: ReLU first, and the rest ends in a conv or norm, so its output
    never aliases its input."""
    return type(node) in NODE_OP_TYPES and type(node[0]) is nn.ReLU
