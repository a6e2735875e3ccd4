"""``random_dag``: a generator's undirected graph turned into the DAG one RandWire stage runs.

The paper's rule (appendix): every edge points from the smaller index to the larger one, which
can never form a cycle. Nodes with no parents read the stage input (sources); nodes with no
children feed the stage output (sinks); an isolated node is both.
"""

from __future__ import annotations

import hashlib
import numbers
import random

import networkx as nx

from rwdet.graphs import generators

# name -> (function, {param: default}). Defaults are the paper's best settings per model
# (Figure 3): ER(0.2), BA(5), WS(4, 0.75).
GENERATORS = {
    "er": (generators.erdos_renyi, {"p": 0.2}),
    "ba": (generators.barabasi_albert, {"m": 5}),
    "ws": (generators.watts_strogatz, {"k": 4, "p": 0.75}),
    "complete": (generators.complete, {}),
}


def _check_int(name: str, value, lo: int, hi: int | None, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} is not an integer; {name} must be {rule}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} is out of range; {name} must be {rule}")
    return value


def check_params(gen: str, n, seed, params: dict) -> dict:
    """Validate generator parameters; return the full parameter dict (defaults filled in)."""
    if gen not in GENERATORS:
        raise ValueError(
            f"gen={gen!r} is not a known generator; choose one of {sorted(GENERATORS)}"
        )
    _check_int("n", n, 2, None, "an integer >= 2 (nodes per stage)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r} is not an integer; pass an integer seed such as 1")
    _, defaults = GENERATORS[gen]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for gen={gen!r}; "
            f"valid parameters: {sorted(defaults) or 'none'}"
        )
    full = {**defaults, **{k: v for k, v in params.items() if v is not None}}
    if "p" in full:
        p = full["p"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p={p!r} is out of range; p must be a probability in [0, 1]")
        full["p"] = float(p)
    if "m" in full:
        full["m"] = _check_int("m", full["m"], 1, n - 1, f"an integer with 1 <= m < n={n}")
    if "k" in full:
        k = _check_int("k", full["k"], 2, n - 1, f"an even integer with 2 <= k < n={n}")
        if k % 2:
            raise ValueError(f"k={k} is odd; WS joins k/2 neighbours on each side, use an even k")
        full["k"] = k
    return full


def random_dag(gen: str, n: int, seed: int, **params) -> nx.DiGraph:
    """A random stage graph: ``networkx.DiGraph`` on nodes ``0..n-1`` with every edge ``u < v``.

    ``gen`` is ``"er"`` (param ``p``), ``"ba"`` (``m``), ``"ws"`` (``k``, ``p``) or
    ``"complete"``. The same (gen, n, seed, params) gives the same graph on every machine.
    The generator, parameters and seed are stored in ``G.graph``.
    """
    full = check_params(gen, n, seed, params)
    fn, _ = GENERATORS[gen]
    edges = fn(n, **full, rng=random.Random(int(seed)))
    g = nx.DiGraph(gen=gen, params=full, seed=int(seed))
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    return g


def sources(g: nx.DiGraph) -> list[int]:
    """Nodes with no parents: they read the stage input (stride 2, channel change)."""
    return sorted(v for v in g.nodes if g.in_degree(v) == 0)


def sinks(g: nx.DiGraph) -> list[int]:
    """Nodes with no children: the stage output is their unweighted mean."""
    return sorted(v for v in g.nodes if g.out_degree(v) == 0)


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage ``stage`` of a network with seed ``seed``.

    Derived by hashing so neighbouring network seeds do not share stage graphs, and so that it
    is the same everywhere (no dependence on Python's hash randomisation).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r} is not an integer; pass an integer seed such as 1")
    digest = hashlib.sha256(f"rwdet-stage:{int(seed)}:{int(stage)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def longest_path_length(g: nx.DiGraph) -> int:
    """Edges on the longest path (0 for a graph with no edges)."""
    return nx.dag_longest_path_length(g) if g.number_of_edges() else 0


def expected_edges(gen: str, n: int, **params) -> int | float:
    """Edge count of a graph from ``gen``: exact for BA/WS/complete, the mean for ER."""
    full = check_params(gen, n, 0, params)
    if gen == "ws":
        return n * full["k"] // 2
    if gen == "ba":
        return full["m"] * (n - full["m"])
    if gen == "complete":
        return n * (n - 1) // 2
    return full["p"] * n * (n - 1) / 2
