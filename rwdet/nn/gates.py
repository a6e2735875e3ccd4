"""Edge gates: the per-edge multipliers of one stage, the seam between wiring modes.

A stage aggregates ``I_v = sum_u gate[u->v] * Z_u`` over its candidate edges. The *gate module*
decides what ``gate`` is; everything else (node ops, execution order, memory release) is shared:

- ``static`` (RandWire): gate = sigmoid(w) for nodes with several parents, exactly 1 (no
  parameter, no multiply) for single-parent nodes; optional edge drop.
- learned (DNW) and score-chosen (edge-popup) gates are registered by ``rwdet.wiring``.
"""

from __future__ import annotations

import torch
from torch import nn


class EdgeGates(nn.Module):
    """Base class. ``edges`` is the candidate edge list ``[(u, v), ...]`` of the stage.

    ``unit_edges`` lists the indices whose gate is identically 1 in every step (the stage
    skips the multiply for them). ``forward()`` returns a 1-D tensor with one gate per edge.
    """

    def __init__(self, edges):
        super().__init__()
        self.edges = [tuple(e) for e in edges]
        self.unit_edges: frozenset[int] = frozenset()

    def active_edges(self) -> list[tuple[int, int]]:
        """Edges present in the network as it would run at inference now."""
        return list(self.edges)


class StaticGates(EdgeGates):
    """RandWire aggregation weights: positive (sigmoid of a free parameter), one per edge.

    Edge drop (paper §4.2, regular regime): in training, with probability ``edge_drop`` per
    forward pass, one edge chosen uniformly among edges whose target has in-degree > 1 gets
    gate 0. It is a multiplicative mask, so every step builds the same autograd graph (DDP
    needs that) and the other gates of that node are unchanged (no re-normalisation).
    """

    def __init__(self, edges, edge_drop: float = 0.0):
        super().__init__(edges)
        if not 0.0 <= edge_drop < 1.0:
            raise ValueError(f"edge_drop={edge_drop} is out of range; use a probability in [0, 1)")
        self.edge_drop = float(edge_drop)
        indeg: dict[int, int] = {}
        for _, v in self.edges:
            indeg[v] = indeg.get(v, 0) + 1
        weighted = [i for i, (_, v) in enumerate(self.edges) if indeg[v] > 1]
        self.unit_edges = frozenset(set(range(len(self.edges))) - set(weighted))
        self.register_buffer("weighted_index", torch.tensor(weighted, dtype=torch.long), False)
        # sigmoid(0) = 0.5: every parent starts with the same positive weight.
        self.weight = nn.Parameter(torch.zeros(len(weighted)))

    def forward(self) -> torch.Tensor:
        gates = torch.ones(len(self.edges), device=self.weight.device, dtype=self.weight.dtype)
        gates = gates.index_put((self.weighted_index,), torch.sigmoid(self.weight))
        if self.training and self.edge_drop > 0 and len(self.weighted_index) > 0:
            mask = torch.ones_like(gates)
            if torch.rand(()) < self.edge_drop:
                pick = torch.randint(len(self.weighted_index), ())
                mask[self.weighted_index[pick]] = 0.0
            gates = gates * mask
        return gates
