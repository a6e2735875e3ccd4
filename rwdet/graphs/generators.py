"""The three random graph models of RandWire §3.3, implemented here rather than taken from networkx.

Why not networkx: its generators draw random numbers in version-dependent ways, and its BA
model (>= 2.6) starts from a star graph, which is not the paper's model (M isolated nodes).
Every draw below goes through ``random.Random.random()`` (Mersenne Twister, whose float stream
Python guarantees across versions and platforms), so a seed gives the same graph everywhere.

Each generator returns an undirected graph as a sorted list of ``(u, v)`` pairs with ``u < v``
over node labels ``0..n-1`` that are already the paper's DAG indices (appendix): ER in a random
order, BA in order of addition, WS clockwise around the ring.
"""

from __future__ import annotations

import random

Edge = tuple[int, int]


def _randbelow(rng: random.Random, n: int) -> int:
    """Uniform integer in [0, n) from one ``random()`` draw (stable across Python versions)."""
    return min(int(rng.random() * n), n - 1)


def _sorted_edges(edges) -> list[Edge]:
    return sorted((min(u, v), max(u, v)) for u, v in edges)


def erdos_renyi(n: int, p: float, rng: random.Random) -> list[Edge]:
    """ER(P): each of the n(n-1)/2 pairs is joined independently with probability P."""
    edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < p]
    # Appendix: "ER: indices are assigned in a random order" (Fisher-Yates on our own draws).
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _randbelow(rng, i + 1)
        order[i], order[j] = order[j], order[i]
    return _sorted_edges((order[u], order[v]) for u, v in edges)


def barabasi_albert(n: int, m: int, rng: random.Random) -> list[Edge]:
    """BA(M): M isolated seed nodes; each new node adds M distinct edges chosen by degree.

    The first new node finds every seed node at degree 0, so it joins all M of them (the only
    way to add M distinct edges); after that every existing node has degree >= 1 and targets are
    drawn proportionally to degree, without replacement. Exactly M*(N-M) edges result.
    """
    degree = [0] * n
    edges: list[Edge] = []
    for new in range(m, n):
        if new == m:
            targets = list(range(m))
        else:
            candidates = list(range(new))
            weights = [degree[c] for c in candidates]
            targets = []
            for _ in range(m):
                r = rng.random() * sum(weights)
                acc, pick = 0.0, len(candidates) - 1
                for idx, w in enumerate(weights):
                    acc += w
                    if r < acc:
                        pick = idx
                        break
                targets.append(candidates.pop(pick))
                weights.pop(pick)
        for t in targets:
            edges.append((t, new))
            degree[t] += 1
            degree[new] += 1
    return _sorted_edges(edges)


def watts_strogatz(n: int, k: int, p: float, rng: random.Random) -> list[Edge]:
    """WS(K, P): ring lattice with K/2 neighbours per side, then clockwise rewiring.

    For i = 1..K/2 and, within it, every node v clockwise, the edge from v to its i-th next node
    is rewired with probability P to a node chosen uniformly among those that are neither v nor
    already adjacent to v. Rewiring moves an edge, never adds one, so the graph has N*K/2 edges.
    The paper's text says N*K; N nodes with K neighbours each count every edge twice, so the
    math gives N*K/2 (networkx's watts_strogatz_graph agrees).
    """
    adj: list[set[int]] = [set() for _ in range(n)]
    for v in range(n):
        for i in range(1, k // 2 + 1):
            w = (v + i) % n
            adj[v].add(w)
            adj[w].add(v)
    for i in range(1, k // 2 + 1):
        for v in range(n):
            if rng.random() >= p:
                continue
            old = (v + i) % n
            candidates = [w for w in range(n) if w != v and w not in adj[v]]
            if not candidates:  # v is already joined to every other node
                continue
            new = candidates[_randbelow(rng, len(candidates))]
            adj[v].discard(old)
            adj[old].discard(v)
            adj[v].add(new)
            adj[new].add(v)
    return _sorted_edges((v, w) for v in range(n) for w in adj[v] if v < w)


def complete(n: int, rng: random.Random) -> list[Edge]:
    """Every pair joined: the candidate set of learned (DNW) wiring over n nodes."""
    del rng
    return [(u, v) for u in range(n) for v in range(u + 1, n)]
