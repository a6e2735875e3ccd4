"""``GraphSpec``: a stage graph as an explicit edge list, the form graphs travel in.

Checkpoints, detection weights and JSON artifacts all carry ``GraphSpec`` dicts, so a trained
model never depends on regenerating its graphs from a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import networkx as nx

from rwdet.atomic import atomic_write
from rwdet.graphs.dag import random_dag


@dataclass(frozen=True)
class GraphSpec:
    """One stage DAG: ``n`` nodes, edges ``(u, v)`` with ``u < v``, and where it came from."""

    n: int
    edges: tuple[tuple[int, int], ...]
    gen: str = "custom"
    params: dict = field(default_factory=dict, compare=False)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={self.n!r} is not a node count; a stage graph needs n >= 1 nodes")
        edges = tuple(sorted((int(u), int(v)) for u, v in self.edges))
        for u, v in edges:
            if not (0 <= u < v < self.n):
                raise ValueError(
                    f"edge ({u}, {v}) is invalid for a {self.n}-node stage DAG; "
                    f"every edge must satisfy 0 <= u < v < n"
                )
        if len(set(edges)) != len(edges):
            raise ValueError("GraphSpec edges contain duplicates; each edge may appear once")
        object.__setattr__(self, "edges", edges)

    @classmethod
    def generate(cls, gen: str, n: int, seed: int, **params) -> GraphSpec:
        return cls.from_networkx(random_dag(gen, n, seed, **params))

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> GraphSpec:
        n = g.number_of_nodes()
        if sorted(g.nodes) != list(range(n)):
            raise ValueError("a stage graph's nodes must be 0..n-1")
        return cls(
            n=n,
            edges=tuple(g.edges),
            gen=g.graph.get("gen", "custom"),
            params=dict(g.graph.get("params", {})),
            seed=g.graph.get("seed"),
        )

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph(gen=self.gen, params=dict(self.params), seed=self.seed)
        g.add_nodes_from(range(self.n))
        g.add_edges_from(self.edges)
        return g

    def parents(self, v: int) -> list[int]:
        return [u for u, w in self.edges if w == v]

    def sources(self) -> list[int]:
        has_parent = {v for _, v in self.edges}
        return [v for v in range(self.n) if v not in has_parent]

    def sinks(self) -> list[int]:
        has_child = {u for u, _ in self.edges}
        return [v for v in range(self.n) if v not in has_child]

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "edges": [list(e) for e in self.edges],
            "gen": self.gen,
            "params": dict(self.params),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        try:
            return cls(
                n=int(d["n"]),
                edges=tuple(tuple(e) for e in d["edges"]),
                gen=d.get("gen", "custom"),
                params=dict(d.get("params") or {}),
                seed=d.get("seed"),
            )
        except KeyError as e:
            raise ValueError(f"graph dict is missing key {e}; expected 'n' and 'edges'") from None

    def fingerprint(self) -> str:
        """Short hash of the wiring alone (n and edges): equal fingerprints, equal networks."""
        payload = json.dumps([self.n, [list(e) for e in self.edges]]).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def graphs_fingerprint(graphs: dict[str, GraphSpec]) -> str:
    """One hash for all stage graphs of a model (compared across DDP ranks and checkpoints)."""
    payload = json.dumps({k: graphs[k].fingerprint() for k in sorted(graphs)}).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def graphs_to_dict(graphs: dict[str, GraphSpec]) -> dict:
    from rwdet import __version__

    return {
        "rwdet_version": __version__,
        "graphs": {k: g.to_dict() for k, g in graphs.items()},
    }


def graphs_from_dict(d: dict) -> dict[str, GraphSpec]:
    if "graphs" not in d:
        raise ValueError("not an rwdet graph artifact: missing key 'graphs'")
    return {k: GraphSpec.from_dict(v) for k, v in d["graphs"].items()}


def save_graphs(path: str, graphs: dict[str, GraphSpec]) -> None:
    """Write a JSON graph artifact atomically (temp file, then rename)."""
    atomic_write(path, lambda f: json.dump(graphs_to_dict(graphs), f, indent=1), mode="w")


def load_graphs(path: str) -> dict[str, GraphSpec]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"graph file {path!r} does not exist")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"graph file {path!r} is not valid JSON: {e}") from None
    return graphs_from_dict(d)
