"""Learned wirings of a ``GraphStage``: DNW and edge-popup as gate modules + wiring modes.

Both plug into the one builder (``rwdet.nn.stage.GraphStage``) through its gate seam; nothing
else about the stage changes. Importing this module registers the wiring modes ``"dnw"`` and
``"popup"`` (``rwdet.nn`` imports it, so ``get_wiring("dnw")`` always works).

``dnw`` — learned wiring on node-level RandWire stages (ours: neither paper does this).
    Candidate edges: the complete DAG over the stage's N nodes, so node 0 is the only source (it
    reads the stage input) and node N-1 the only sink (it is the stage output), whatever edges
    are real. The candidate set never changes, so every step builds the same autograd graph
    (DDP needs no ``find_unused_parameters``). Budget: ``k`` = the edge count of the generator's
    graph passed to ``make_gates`` (N*K/2 for WS), so a DNW stage has as many real edges as the
    random stage it replaces. A gate is the signed weight ``w_uv`` itself (no sigmoid) — the
    paper's ``I_v = sum w_uv Z_u`` — initialised uniformly in [-1, 1] (Algorithm 1, line 2).
    A node whose real in-edges are all gone aggregates zeros; one with no real path to the
    output is dead (``rwdet.sparse_complexity`` skips it; ``rwdet.nn.export`` removes it).

``popup`` — edge-popup on every conv weight (``PopupConv2d``), the classifier
    (``PopupLinear``) and the aggregation edges (``PopupGates``), with non-affine BN.
    Decision: the candidate edges of ``PopupGates`` are the generator graph's own edges, not the
    complete DAG. edge-popup looks for a subnetwork *of a given random network*; the random
    network here is the RandWire one, whose sources read the stage input as in RandWire.
    The fixed edge weights follow the conv layers' ``init`` with the aggregation seen as a
    linear layer of fan-in ``in-degree(v)`` and gain 1 (no ReLU between the sum and its
    inputs): kaiming normal ``N(0, 1/indeg)`` or signed constant ``+-1/sqrt(indeg)``, divided
    by ``sqrt(k)`` when ``scale``. The stage's edges form one layer: ``round(k*|E|)`` are kept.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.choose import dnw_weight, kept_count, popup_mask, topk_mask
from rwdet.nn.gates import EdgeGates
from rwdet.nn.sparse_layers import (
    PopupConv2d,
    PopupLinear,
    _check_init,
    init_fixed_,
    nonaffine_batchnorm,
)
from rwdet.nn.wiring import Wiring, register_wiring


def complete_dag_edges(n: int) -> list[tuple[int, int]]:
    return [(u, v) for u in range(n) for v in range(u + 1, n)]


class DNWGates(EdgeGates):
    """DNW on a node-level stage: the ``budget`` largest-``|w|`` edges of the complete DAG."""

    def __init__(self, spec: GraphSpec, budget: int | None = None):
        super().__init__(complete_dag_edges(spec.n))
        budget = len(spec.edges) if budget is None else budget
        if not 1 <= budget <= len(self.edges):
            raise ValueError(
                f"DNW edge budget {budget} is out of range for a {spec.n}-node stage; it must be "
                f"in [1, {len(self.edges)}] (the budget is the generator graph's edge count: "
                f"use a generator setting that yields at least one edge)"
            )
        self.budget = int(budget)
        self.weight = nn.Parameter(torch.empty(len(self.edges)).uniform_(-1.0, 1.0))

    def kept_mask(self) -> torch.Tensor:
        return topk_mask(self.weight.abs(), self.budget).bool()

    def forward(self) -> torch.Tensor:
        return dnw_weight(self.weight, self.budget)

    def active_edges(self) -> list[tuple[int, int]]:
        return [e for e, keep in zip(self.edges, self.kept_mask().tolist()) if keep]

    def extra_repr(self) -> str:
        return f"candidates={len(self.edges)}, budget={self.budget}"


class PopupGates(EdgeGates):
    """edge-popup on a stage's aggregation edges: fixed random weights, learned scores."""

    def __init__(self, spec: GraphSpec, k: float = 0.3, init="signed_constant", scale=True):
        super().__init__(spec.edges)
        if not self.edges:
            raise ValueError("wiring='popup' needs a stage graph with at least one edge")
        _check_init(init)
        self.k, self.init, self.scale = float(k), init, bool(scale)
        self.count = kept_count(k, len(self.edges))
        indeg: dict[int, int] = {}
        for _, v in self.edges:
            indeg[v] = indeg.get(v, 0) + 1
        std = torch.tensor([1.0 / math.sqrt(indeg[v] * (self.k if scale else 1.0)) for _, v in self.edges])
        weight = init_fixed_(torch.empty(len(self.edges)), 1.0, init) * std
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scores = nn.Parameter(torch.empty(len(self.edges)).uniform_(-1.0, 1.0))

    def kept_mask(self) -> torch.Tensor:
        return topk_mask(self.scores.abs(), self.count).bool()

    def forward(self) -> torch.Tensor:
        return self.weight * popup_mask(self.scores, self.count)

    def active_edges(self) -> list[tuple[int, int]]:
        return [e for e, keep in zip(self.edges, self.kept_mask().tolist()) if keep]

    def extra_repr(self) -> str:
        return f"edges={len(self.edges)}, k={self.k}, kept={self.count}, init={self.init}"


class FixedGates(EdgeGates):
    """Constant per-edge multipliers: the frozen form of any learned gates (``export``)."""

    def __init__(self, edges, values: torch.Tensor):
        super().__init__(edges)
        values = torch.as_tensor(values).detach().clone().float()
        if values.shape != (len(self.edges),):
            raise ValueError(f"need one gate value per edge ({len(self.edges)}), got {values.shape}")
        self.register_buffer("values", values)

    def forward(self) -> torch.Tensor:
        return self.values


def _no_edge_drop(mode: str, edge_drop: float) -> None:
    if edge_drop:
        raise ValueError(
            f"edge_drop={edge_drop} is RandWire's regulariser and is not defined for "
            f"wiring={mode!r}; pass edge_drop=0"
        )


@register_wiring("dnw")
def dnw_wiring() -> Wiring:
    def make_gates(spec: GraphSpec, edge_drop: float) -> DNWGates:
        _no_edge_drop("dnw", edge_drop)
        return DNWGates(spec)

    return Wiring("dnw", make_gates)


@register_wiring("popup")
def popup_wiring(k: float = 0.3, init: str = "signed_constant", scale: bool = True) -> Wiring:
    """edge-popup everywhere: k = fraction kept per layer (hidden-networks' ImageNet k=0.3)."""
    kept_count(k, 1)  # validates k with the library's one error message
    _check_init(init)

    def make_gates(spec: GraphSpec, edge_drop: float) -> PopupGates:
        _no_edge_drop("popup", edge_drop)
        return PopupGates(spec, k=k, init=init, scale=scale)

    opts = {"k": k, "init": init, "scale": scale}
    return Wiring(
        "popup",
        make_gates,
        conv_layer=partial(PopupConv2d, **opts),
        norm_layer=nonaffine_batchnorm,
        linear_layer=partial(PopupLinear, **opts),
        options=opts,
    )


LEARNED_GATES = (DNWGates, PopupGates)
__all__ = ["DNWGates", "FixedGates", "LEARNED_GATES", "PopupGates", "complete_dag_edges"]
