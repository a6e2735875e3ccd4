"""Graph damage: removing a node or an edge changes exactly what RandWire §4.1 says."""

import torch
from test_builder import probe_stage

from rwdet.analysis.damage import damage_study, plot_damage, removed
from rwdet.graphs import GraphSpec


def test_removing_an_edge_drops_one_term_and_keeps_other_weights():
    spec = GraphSpec(n=3, edges=((0, 2), (1, 2)))
    stage = probe_stage(spec)
    x = torch.zeros(1, 2, 1, 1)
    w = torch.sigmoid(stage.gates.weight.detach())
    e01 = stage.gates.edges.index((0, 2))
    with removed(stage, edge=e01):
        stage(x)
        assert torch.allclose(stage.nodes[2].seen, torch.full_like(x, (w[1] * 10).item()))
    stage(x)  # restored afterwards
    assert torch.allclose(stage.nodes[2].seen, torch.full_like(x, (w[0] * 1 + w[1] * 10).item()))


def test_removing_a_node_cuts_its_children_and_its_sink_share():
    spec = GraphSpec(n=3, edges=((0, 1),))  # sinks: 1 and 2 (isolated)
    stage = probe_stage(spec)
    x = torch.zeros(1, 2, 1, 1)
    with removed(stage, node=0):
        out = stage(x)
        assert torch.allclose(stage.nodes[1].seen, torch.zeros_like(x))  # lost its only input
        assert torch.allclose(out, torch.full_like(x, (10 + 100) / 2))
    with removed(stage, node=2):
        assert torch.allclose(stage(x), torch.full_like(x, 1 + 10))  # only sink 1 remains


def test_damage_study_covers_every_node_and_edge(tmp_path):
    spec = GraphSpec(n=4, edges=((0, 1), (0, 2), (1, 3), (2, 3)))
    stage = probe_stage(spec)
    x = torch.zeros(1, 2, 1, 1)

    @torch.no_grad()
    def evaluate(model):
        return float(model(x).mean())

    study = damage_study(stage, evaluate)
    nodes = [r for r in study["results"] if r["kind"] == "node"]
    edges = [r for r in study["results"] if r["kind"] == "edge"]
    assert len(nodes) == 4 and len(edges) == 4
    assert {r["node"]: r["out_degree"] for r in nodes} == {0: 2, 1: 1, 2: 1, 3: 0}
    assert all(r["target_in_degree"] == (2 if r["edge"][1] == 3 else 1) for r in edges)
    assert all(r["delta"] < 0 for r in nodes if r["node"] != 3)  # the probes only add
    assert plot_damage(study, str(tmp_path / "damage.png")).endswith(".png")


def test_damage_lives_outside_the_stage():
    """Issue 15: the stage holds no damage state; ``removed`` swaps in gates whose removed
    edges are 0 (and no longer unit edges) and restores the stage exactly."""
    import torch

    from rwdet.analysis.damage import DamagedGates
    from rwdet.models import build_model

    model = build_model("randwire_small", channels=8, nodes=6, num_classes=10).eval()
    stage = next(m for m in model.modules() if hasattr(m, "sinks"))
    assert not hasattr(stage, "removed_edges") and not hasattr(stage, "removed_nodes")
    gates, sinks = stage.gates, list(stage.sinks)
    unit = next(iter(gates.unit_edges))
    with removed(stage, edge=unit):
        assert isinstance(stage.gates, DamagedGates) and unit not in stage.gates.unit_edges
        assert stage.gates()[unit] == 0
    assert stage.gates is gates and stage.sinks == sinks
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with removed(stage, node=sinks[0]):
            damaged = model(x)
        assert torch.equal(model(x), ref) and not torch.equal(damaged, ref)
