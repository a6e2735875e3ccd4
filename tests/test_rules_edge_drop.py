"""Edge drop (RandWire §4.2, regular regime) measured, not sampled once.

The paper: "for each training minibatch, we randomly remove one edge whose target node has
input degree > 1 with probability of 0.1". rwdet draws it per stage and forward pass. These
tests draw it thousands of times (seeded, well under a second) and check the rate, that every
droppable edge is picked about equally often, that single-input edges never are, and that the
node whose edge is dropped sees exactly its input minus that one term.
"""

import math

import torch

from rwdet.graphs import GraphSpec
from rwdet.nn import GraphStage, StaticGates

DRAWS = 4000
P = 0.1


def _gates(spec, p=P):
    gates = StaticGates(spec.edges, p)
    with torch.no_grad():
        gates.weight.copy_(torch.linspace(-1.5, 1.5, len(gates.weight)))
    return gates.train()


def _counts(gates, draws=DRAWS, seed=0):
    torch.manual_seed(seed)
    per_edge = torch.zeros(len(gates.edges), dtype=torch.long)
    steps_with_drop = 0
    for _ in range(draws):
        zero = gates().detach() == 0
        assert int(zero.sum()) <= 1, "more than one edge dropped in one step"
        per_edge += zero.long()
        steps_with_drop += int(zero.any())
    return per_edge, steps_with_drop


def test_drop_rate_is_p_within_a_binomial_bound():
    spec = GraphSpec.generate("ws", 16, 3, k=4, p=0.75)
    for p in (0.1, 0.3):
        _, hits = _counts(_gates(spec, p))
        sd = math.sqrt(DRAWS * p * (1 - p))
        assert abs(hits - DRAWS * p) < 5 * sd, (p, hits)


def test_every_droppable_edge_equally_likely_single_input_edges_never():
    spec = GraphSpec.generate("ws", 12, 5, k=4, p=0.75)
    gates = _gates(spec, p=0.9)  # many drops: a sharp uniformity test in few draws
    per_edge, hits = _counts(gates, draws=6000)
    weighted = gates.weighted_index.tolist()
    assert weighted and len(gates.unit_edges) > 0  # both kinds exist in this graph
    assert all(per_edge[i] == 0 for i in gates.unit_edges)
    observed = per_edge[weighted].double()
    expected = hits / len(weighted)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(weighted) - 1
    # Wilson-Hilferty: the chi-square 99.99th percentile is below dof + 6 * sqrt(2 * dof) + 10.
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof, observed.tolist())
    assert observed.min() > 0.5 * expected  # e.g. an off-by-one never picks the last edge


class _Const(torch.nn.Module):
    """A node op that records its input and outputs a node-specific constant map."""

    def __init__(self, value):
        super().__init__()
        self.value, self.seen = value, None

    def forward(self, x):
        self.seen = x.detach().clone()
        return torch.full_like(x, self.value)


def test_the_dropped_edge_removes_exactly_its_term_from_the_node_input():
    spec = GraphSpec(n=5, edges=((0, 2), (1, 2), (0, 3), (2, 3), (1, 3), (3, 4)))
    stage = GraphStage(spec, 1, 1, stride=1, gates=_gates(spec, p=0.5), execution="reference")
    for v in range(spec.n):
        stage.nodes[v] = _Const(float(3**v))  # Z_v = 3**v: every subset sum is distinct
    clean = stage.gates.eval()().detach()
    stage.train()
    x = torch.zeros(1, 1, 1, 1)
    seen_drops = set()
    for seed in range(200):
        torch.manual_seed(seed)
        stage(x)
        for v in (2, 3, 4):
            full = sum(float(clean[e]) * 3**u for e, (u, w) in enumerate(spec.edges) if w == v)
            got = float(stage.nodes[v].seen)
            if math.isclose(got, full, rel_tol=1e-6):
                continue
            gaps = [
                (e, full - float(clean[e]) * 3**u) for e, (u, w) in enumerate(spec.edges) if w == v
            ]
            match = [e for e, value in gaps if math.isclose(got, value, rel_tol=1e-6)]
            assert len(match) == 1, (seed, v, got, full)
            seen_drops.add(spec.edges[match[0]])
    # Every edge into a multi-input node was dropped at some point; (3, 4) never (single input).
    assert seen_drops == {(0, 2), (1, 2), (0, 3), (2, 3), (1, 3)}


def test_no_drop_at_inference():
    spec = GraphSpec.generate("ws", 12, 5, k=4, p=0.75)
    gates = _gates(spec, p=0.9).eval()
    assert all(bool((gates() > 0).all()) for _ in range(200))
