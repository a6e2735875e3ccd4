"""Generator properties, DAG rule, determinism, parameter validation and artifacts."""

import json
import subprocess
import sys

import networkx as nx
import pytest

from rwdet.graphs import (
    GraphSpec,
    expected_edges,
    load_graphs,
    random_dag,
    save_graphs,
    sinks,
    sources,
    stage_seed,
)

CASES = [("er", {"p": 0.2}), ("ba", {"m": 5}), ("ws", {"k": 4, "p": 0.75}), ("complete", {})]


@pytest.mark.parametrize("gen,params", CASES)
def test_dag_rule_and_node_set(gen, params):
    for seed in range(5):
        g = random_dag(gen, 32, seed, **params)
        assert sorted(g.nodes) == list(range(32))
        assert all(u < v for u, v in g.edges)
        assert nx.is_directed_acyclic_graph(g)
        assert g.graph["gen"] == gen and g.graph["seed"] == seed


@pytest.mark.parametrize("n,k", [(32, 4), (16, 4), (10, 6), (5, 2), (9, 8)])
def test_ws_edge_count_is_nk_over_2(n, k):
    for seed in range(10):
        for p in (0.0, 0.5, 1.0):
            assert random_dag("ws", n, seed, k=k, p=p).number_of_edges() == n * k // 2


def test_ws_p0_is_ring_lattice_indexed_clockwise():
    g = random_dag("ws", 12, 3, k=4, p=0.0)
    ring = {(min(v, (v + i) % 12), max(v, (v + i) % 12)) for v in range(12) for i in (1, 2)}
    assert set(g.edges) == ring


def test_ws_rewiring_changes_graph_and_avoids_duplicates():
    lattice = set(random_dag("ws", 32, 0, k=4, p=0.0).edges)
    rewired = random_dag("ws", 32, 0, k=4, p=0.75)
    assert set(rewired.edges) != lattice
    assert len(set(rewired.edges)) == rewired.number_of_edges()  # no duplicate edges


@pytest.mark.parametrize("n,m", [(32, 5), (32, 1), (10, 9), (8, 3)])
def test_ba_edge_count_and_first_node(n, m):
    for seed in range(10):
        g = random_dag("ba", n, seed, m=m)
        assert g.number_of_edges() == m * (n - m)
        # The first added node (index m) joins all m initial nodes.
        assert sorted(g.predecessors(m)) == list(range(m))
        # Indices follow order of addition: node t's edges to earlier nodes are exactly m.
        for t in range(m, n):
            assert g.in_degree(t) == m
        for t in range(m):
            assert g.in_degree(t) == 0


def test_ba_prefers_high_degree_nodes():
    """Preferential attachment: seed nodes end with a much higher degree than late nodes."""
    early, late = 0.0, 0.0
    for seed in range(40):
        g = random_dag("ba", 64, seed, m=2).to_undirected()
        early += sum(g.degree(v) for v in range(4)) / 4
        late += sum(g.degree(v) for v in range(56, 64)) / 8
    assert early > 2 * late


def test_ba_differs_from_networkx_star_start():
    """networkx >= 2.6 starts BA from a star; ours starts from M isolated nodes."""
    g = random_dag("ba", 10, 0, m=3)
    assert all(g.in_degree(v) == 0 for v in range(3))
    assert g.out_degree(0) >= 1 and set(g.successors(0)) >= {3}


def test_er_density_and_random_index_order():
    n, p, total = 32, 0.2, 0
    for seed in range(50):
        total += random_dag("er", n, seed, p=p).number_of_edges()
    mean = total / 50
    assert abs(mean - expected_edges("er", n, p=p)) < 0.1 * expected_edges("er", n, p=p)
    assert random_dag("er", n, 0, p=0.0).number_of_edges() == 0
    assert random_dag("er", n, 0, p=1.0).number_of_edges() == n * (n - 1) // 2
    # Random index order: in-degree is not monotone in the index as in a fixed-order DAG.
    g = random_dag("er", 200, 1, p=0.05)
    firsts = sum(g.in_degree(v) for v in range(20))
    assert firsts < sum(g.in_degree(v) for v in range(180, 200))


def test_same_seed_same_graph_different_seed_different_graph():
    for gen, params in CASES[:3]:
        a = random_dag(gen, 32, 7, **params)
        b = random_dag(gen, 32, 7, **params)
        c = random_dag(gen, 32, 8, **params)
        assert list(a.edges) == list(b.edges)
        assert list(a.edges) != list(c.edges)


def test_same_graph_in_another_process():
    code = (
        "from rwdet.graphs import random_dag;"
        "print([sorted(random_dag(g, 32, 5, **p).edges) for g, p in "
        "[('er', {'p': 0.2}), ('ba', {'m': 5}), ('ws', {'k': 4, 'p': 0.75})]])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    here = [sorted(random_dag(g, 32, 5, **p).edges) for g, p in CASES[:3]]
    assert out.strip() == str(here)


def test_known_graphs_are_pinned():
    """Pins graphs so any change to a generator's random stream cannot go unnoticed."""
    assert sorted(random_dag("ws", 8, 1, k=2, p=0.5).edges) == [
        (0, 5), (0, 6), (1, 2), (2, 5), (3, 5), (4, 5), (4, 7), (6, 7)
    ]  # fmt: skip
    assert sorted(random_dag("ba", 6, 1, m=2).edges) == [
        (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (2, 5), (3, 4), (3, 5)
    ]  # fmt: skip
    assert sorted(random_dag("er", 6, 1, p=0.5).edges) == [
        (0, 2), (0, 4), (0, 5), (1, 4), (1, 5), (2, 3), (2, 4), (3, 4), (4, 5)
    ]  # fmt: skip


def test_stage_seeds_differ_and_are_stable():
    seeds = [stage_seed(1, i) for i in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [stage_seed(1, i) for i in range(4)]
    assert stage_seed(2, 0) not in seeds


def test_isolated_node_is_source_and_sink():
    g = random_dag("er", 6, 0, p=0.0)
    assert sources(g) == list(range(6)) and sinks(g) == list(range(6))
    spec = GraphSpec(n=4, edges=((0, 1),))
    assert 3 in spec.sources() and 3 in spec.sinks()


@pytest.mark.parametrize(
    "gen,n,seed,params,needle",
    [
        ("xx", 32, 1, {}, "gen='xx'"),
        ("ws", 1, 1, {}, "n=1"),
        ("ws", 32, 1, {"k": 3}, "k=3"),
        ("ws", 8, 1, {"k": 8}, "k=8"),
        ("ws", 32, 1, {"p": 1.5}, "p=1.5"),
        ("er", 32, 1, {"p": -0.1}, "p=-0.1"),
        ("ba", 32, 1, {"m": 0}, "m=0"),
        ("ba", 8, 1, {"m": 8}, "m=8"),
        ("ws", 32, 1.5, {}, "seed=1.5"),
        ("ws", 32, "1", {}, "seed='1'"),
        ("er", 32, 1, {"k": 4}, "unknown parameter"),
    ],
)
def test_invalid_parameters_raise_clear_errors(gen, n, seed, params, needle):
    with pytest.raises(ValueError, match=None) as err:
        random_dag(gen, n, seed, **params)
    assert needle in str(err.value)


def test_json_round_trip(tmp_path):
    graphs = {
        f"conv{i}": GraphSpec.generate("ws", 32, stage_seed(3, i), k=4, p=0.75) for i in range(3)
    }
    path = tmp_path / "graphs.json"
    save_graphs(str(path), graphs)
    data = json.loads(path.read_text())
    assert data["rwdet_version"]
    assert data["graphs"]["conv0"]["gen"] == "ws"
    assert data["graphs"]["conv0"]["params"] == {"k": 4, "p": 0.75}
    loaded = load_graphs(str(path))
    assert loaded == graphs
    assert [g.fingerprint() for g in loaded.values()] == [g.fingerprint() for g in graphs.values()]


def test_graphspec_rejects_bad_edges():
    with pytest.raises(ValueError, match="0 <= u < v < n"):
        GraphSpec(n=3, edges=((2, 1),))
    with pytest.raises(ValueError, match="duplicates"):
        GraphSpec(n=3, edges=((0, 1), (0, 1)))
    for n in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=f"n={n!r} is not a node count"):
            GraphSpec(n=n, edges=())
