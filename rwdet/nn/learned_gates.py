"""Learned wirings: DNW and edge-popup as gate modules of a ``GraphStage``, and every learned
wiring's registration (``rwdet.nn.wiring``).

The gates plug into the one builder (``rwdet.nn.stage.GraphStage``) through its gate seam;
nothing else about the stage changes. Importing this module registers ``"dnw"`` and
``"popup"`` for node-level stages and ``"dnw"``, ``"popup"`` and ``"supermask"`` for models
without node graphs (``rwdet.nn`` imports it, so ``get_wiring("dnw")`` always works).

``dnw`` — learned wiring on node-level RandWire stages (ours: neither paper does this).
    Candidate edges: the complete DAG over the stage's N nodes, so node 0 is the only source (it
    reads the stage input) and node N-1 the only sink (it is the stage output), whatever edges
    are real. The candidate set never changes, so every step builds the same autograd graph
    (DDP needs no ``find_unused_parameters``). Budget (``DNWGates.budget``): the edge count of
    the generator's graph passed to ``make_gates`` (N*K/2 for WS), so a DNW stage has as many
    real edges as the random stage it replaces. A gate is the signed weight ``w_uv`` itself (no
    sigmoid) — the paper's ``I_v = sum w_uv Z_u`` — initialised uniformly in [-1, 1]
    (Algorithm 1, line 2), or, with ``wiring_options={"init": "generator"}``, so that the first
    real edges are exactly the generator's graph (training starts from the RandWire wiring).
    A node whose real in-edges are all gone aggregates zeros; one with no real path to the
    output is dead (``rwdet.complexity.sparse`` skips it; ``rwdet.nn.export`` removes it).

``popup`` — edge-popup on every conv weight (``PopupConv2d``), the classifier
    (``PopupLinear``) and the aggregation edges (``PopupGates``), with non-affine BN.
    Decision: the candidate edges of ``PopupGates`` are the generator graph's own edges, not the
    complete DAG. edge-popup looks for a subnetwork *of a given random network*; the random
    network here is the RandWire one, whose sources read the stage input as in RandWire.
    The fixed edge weights follow the conv layers' ``init`` with the aggregation seen as a
    linear layer of fan-in ``in-degree(v)`` and gain 1 (no ReLU between the sum and its
    inputs): kaiming normal ``N(0, 1/indeg)`` or signed constant ``+-1/sqrt(indeg)`` (kaiming
    uniform likewise), the Xavier pair at ``std = sqrt(2 / (indeg + 1))`` (fan-out 1: a node is
    one output), every std divided by ``sqrt(keep)`` when ``scale``.
    What is a "layer" here: the in-edges of one node. ``I_v = sum_u w_uv Z_u`` is a linear layer
    of fan-in ``indeg(v)``, so each node keeps ``kept_count(keep, indeg(v))`` (>= 1) of its
    in-edges, chosen by ``|score|`` with the same rule as every conv. Ranking a whole stage's ~2N
    edges as one layer would cut most nodes off at keep = 0.3 (mean in-degree 2 under WS(4, p))
    and often leave every sink without input: a network with constant output and no gradient at all.
    A node with no kept in-edge would output a constant (non-affine BN of zeros is 0) and pass
    no gradient (ReLU'(0) = 0), so it could never recover; per-node layers rule that out.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.choose import dnw_weight, kept_count, popup_mask, refuse_k, topk_mask
from rwdet.nn.gates import EdgeGates
from rwdet.nn.inits import fan_rule
from rwdet.nn.sparse_layers import (
    DNWConv2d,
    DNWLinear,
    PopupConv2d,
    PopupLinear,
    SupermaskConv2d,
    SupermaskLinear,
    _check_init,
    init_fixed_,
    nonaffine_batchnorm,
)
from rwdet.nn.wiring import Wiring, register_wiring

DNW_INITS = ("uniform", "generator")


def complete_dag_edges(n: int) -> list[tuple[int, int]]:
    return [(u, v) for u in range(n) for v in range(u + 1, n)]


class ChosenEdges(EdgeGates):
    """Gates that choose their live edges among candidates (DNW, edge-popup): a subclass gives
    ``kept_mask()``; the live edges and the kept counts follow from it here, once."""

    def kept_mask(self) -> torch.Tensor:
        raise NotImplementedError

    def active_edges(self) -> list[tuple[int, int]]:
        return [e for e, keep in zip(self.edges, self.kept_mask().tolist()) if keep]

    def kept_counts(self, cx) -> dict:
        """For ``rwdet.complexity.sparse``: the searched network has every candidate edge;
        the found one keeps the chosen edges into live nodes (``cx.live_nodes``)."""
        live = cx.live_nodes
        kept = sum(1 for _, v in self.active_edges() if live is None or live[v])
        return dict(params_dense=len(self.edges), params_kept=kept, flops_dense=0, flops=0)


class DNWGates(ChosenEdges):
    """DNW on a node-level stage: the ``budget`` largest-``|w|`` edges of the complete DAG."""

    def __init__(self, spec: GraphSpec, budget: int | None = None, init: str = "uniform"):
        """init: "uniform" (Algorithm 1: |w| ~ U(0, 1), random sign, so the first real edges
        are a random ``budget``-subset) or "generator" (the generator graph's edges get |w| in
        [0.5, 1), the others [0, 0.5): training starts from the RandWire graph itself)."""
        if init not in DNW_INITS:
            raise ValueError(f"init={init!r} is not known for DNW gates; use one of {DNW_INITS}")
        super().__init__(complete_dag_edges(spec.n))
        budget = len(spec.edges) if budget is None else budget
        if not 1 <= budget <= len(self.edges):
            raise ValueError(
                f"DNW edge budget {budget} is out of range for a {spec.n}-node stage; it must be "
                f"in [1, {len(self.edges)}] (the budget is the generator graph's edge count: "
                f"use a generator setting that yields at least one edge)"
            )
        self.budget, self.init = int(budget), init
        magnitude = torch.rand(len(self.edges))
        if init == "generator":
            in_graph = torch.tensor([e in set(spec.edges) for e in self.edges])
            magnitude = torch.where(in_graph, 0.5 + magnitude / 2, magnitude / 2)
        sign = torch.where(torch.rand(len(self.edges)) < 0.5, -1.0, 1.0)
        self.weight = nn.Parameter(magnitude * sign)

    def kept_mask(self) -> torch.Tensor:
        return topk_mask(self.weight.abs(), self.budget).bool()

    def forward(self) -> torch.Tensor:
        return dnw_weight(self.weight, self.budget)

    def extra_repr(self) -> str:
        return f"candidates={len(self.edges)}, budget={self.budget}"


class PopupGates(ChosenEdges):
    """edge-popup on a stage's aggregation edges: fixed random weights, learned scores; each
    node's in-edges are one layer (module docstring)."""

    def __init__(
        self, spec: GraphSpec, keep: float = 0.3, init="signed_constant", scale=True, k=None
    ):
        refuse_k(k, "PopupGates")
        super().__init__(spec.edges)
        if not self.edges:
            raise ValueError("wiring='popup' needs a stage graph with at least one edge")
        _check_init(init)
        self.keep, self.init, self.scale = float(keep), init, bool(scale)
        into: dict[int, list[int]] = {}
        for e, (_, v) in enumerate(self.edges):
            into.setdefault(v, []).append(e)
        # One (edge indices, kept count) per node with parents: each is one popup "layer".
        self.groups = [(ix, kept_count(keep, len(ix))) for ix in into.values()]
        self.count = sum(c for _, c in self.groups)
        fan_in = torch.tensor([float(len(into[v])) for _, v in self.edges])
        f = self.keep if scale else 1.0
        if fan_rule(init) == "xavier":  # a node's in-edges as a (1 x indeg) layer: fan_out 1
            std = torch.sqrt(2.0 / ((fan_in + 1.0) * f))
        else:  # gain 1: the aggregation is linear
            std = 1.0 / torch.sqrt(fan_in * f)
        weight = init_fixed_(torch.empty(len(self.edges)), 1.0, init) * std
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scores = nn.Parameter(torch.empty(len(self.edges)).uniform_(-1.0, 1.0))

    def kept_mask(self) -> torch.Tensor:
        with torch.no_grad():
            return popup_mask(self.scores, 0, self.groups).bool()

    def forward(self) -> torch.Tensor:
        return self.weight * popup_mask(self.scores, 0, self.groups)

    def extra_repr(self) -> str:
        return f"edges={len(self.edges)}, keep={self.keep}, kept={self.count}, init={self.init}"


class FixedGates(EdgeGates):
    """Constant per-edge multipliers: the frozen form of any learned gates (``export``)."""

    def __init__(self, edges, values: torch.Tensor):
        super().__init__(edges)
        values = torch.as_tensor(values).detach().clone().float()
        if values.shape != (len(self.edges),):
            raise ValueError(
                f"need one gate value per edge ({len(self.edges)}), got {values.shape}"
            )
        self.register_buffer("values", values)

    def forward(self) -> torch.Tensor:
        return self.values

    def active_edges(self) -> list[tuple[int, int]]:
        """Zero-valued edges carry nothing (export adds them only to keep shapes exact)."""
        return [e for e, w in zip(self.edges, self.values.tolist()) if w != 0.0]

    def kept_counts(self, cx) -> dict:
        """For ``rwdet.complexity.sparse``: one value per non-zero edge, dense and kept alike
        (the values are a buffer, not parameters, but they are the exported network's)."""
        kept = len(self.active_edges())
        return dict(params_dense=kept, params_kept=kept, flops_dense=0, flops=0)


def _no_edge_drop(mode: str, edge_drop: float) -> None:
    if edge_drop:
        raise ValueError(
            f"edge_drop={edge_drop} is RandWire's regulariser and is not defined for "
            f"wiring={mode!r}; pass edge_drop=0"
        )


@register_wiring("dnw")
def dnw_wiring(init: str = "uniform") -> Wiring:
    """DNW on node-level stages; ``init`` picks the first real edges (``DNWGates``)."""
    if init not in DNW_INITS:
        raise ValueError(f"init={init!r} is not known for wiring='dnw'; use one of {DNW_INITS}")
    return Wiring("dnw", partial(_dnw_gates, init=init), options={"init": init})


# Gate factories are module functions bound with ``partial`` (not closures), so a model that
# keeps its ``Wiring`` still pickles.
def _dnw_gates(spec: GraphSpec, edge_drop: float, init: str) -> DNWGates:
    _no_edge_drop("dnw", edge_drop)
    return DNWGates(spec, init=init)


def _popup_gates(spec: GraphSpec, edge_drop: float, **opts) -> PopupGates:
    _no_edge_drop("popup", edge_drop)
    return PopupGates(spec, **opts)


@register_wiring("popup", levels=("node", "weight"))
def popup_wiring(
    keep: float = 0.3, init: str = "signed_constant", scale: bool = True, k=None
) -> Wiring:
    """edge-popup everywhere: ``keep`` = fraction kept per layer (the paper's ImageNet k=0.3)."""
    refuse_k(k, "wiring 'popup'")
    kept_count(keep, 1)  # validates keep with the library's one error message
    _check_init(init)
    opts = {"keep": keep, "init": init, "scale": scale}
    return Wiring(
        "popup",
        partial(_popup_gates, **opts),
        conv_layer=partial(PopupConv2d, **opts),
        norm_layer=nonaffine_batchnorm,
        linear_layer=partial(PopupLinear, **opts),
        learned_weights=False,
        options=opts,
    )


@register_wiring("dnw", levels=("weight",))
def dnw_layers_wiring(keep: float = 0.1, k=None) -> Wiring:
    """DNW sparse training (§3.4, Table 4): every conv and FC keeps the ``keep`` largest
    ``|w|`` of its own weights; biases and BatchNorm stay dense."""
    refuse_k(k, "wiring 'dnw'")
    kept_count(keep, 1)
    opts = {"keep": keep}
    return Wiring(
        "dnw",
        conv_layer=partial(DNWConv2d, **opts),
        linear_layer=partial(DNWLinear, **opts),
        options=opts,
    )


@register_wiring("supermask", levels=("weight",))
def supermask_wiring(
    keep: float = 0.5,
    init: str = "signed_constant",
    scale: bool = False,
    eval_mask: str = "threshold",
    k=None,
) -> Wiring:
    """Zhou et al.'s sampled masks of fixed random weights (edge-popup §2, §4.4); ``keep``
    only sizes the scaled init. Not defined on node-level stages: no gate samples edges."""
    refuse_k(k, "wiring 'supermask'")
    kept_count(keep, 1)
    _check_init(init)
    opts = {"keep": keep, "init": init, "scale": scale, "eval_mask": eval_mask}
    return Wiring(
        "supermask",
        conv_layer=partial(SupermaskConv2d, **opts),
        norm_layer=nonaffine_batchnorm,
        linear_layer=partial(SupermaskLinear, **opts),
        learned_weights=False,
        options=opts,
    )


LEARNED_GATES = (DNWGates, PopupGates)
__all__ = ["DNWGates", "FixedGates", "LEARNED_GATES", "PopupGates", "complete_dag_edges"]
