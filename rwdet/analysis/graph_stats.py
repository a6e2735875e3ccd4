"""Summary statistics of stage graphs (RandWire §4.1 looks at degrees; Figure 4 at shape)."""

from __future__ import annotations

import networkx as nx
import torch

from rwdet.graphs import GraphSpec, graphs_from_dict, longest_path_length


def stage_stats(spec: GraphSpec) -> dict:
    g = spec.to_networkx()
    indeg = [d for _, d in g.in_degree()]
    outdeg = [d for _, d in g.out_degree()]
    return {
        "nodes": spec.n,
        "edges": len(spec.edges),
        "sources": len(spec.sources()),
        "sinks": len(spec.sinks()),
        "mean_in_degree": sum(indeg) / spec.n,
        "max_in_degree": max(indeg),
        "max_out_degree": max(outdeg),
        "longest_path": longest_path_length(g),
        # Clustering of the undirected graph: WS is highly clustered, ER and BA are not.
        "clustering": nx.average_clustering(g.to_undirected()),
        "gen": spec.gen,
        "params": spec.params,
        "seed": spec.seed,
    }


def graphs_from_checkpoint(path: str) -> dict[str, GraphSpec]:
    """Stage graphs stored in an rwdet classification checkpoint (no model is built)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "graphs" not in ckpt:
        raise ValueError(f"{path!r} holds no 'graphs'; pass an rwdet classification checkpoint")
    return graphs_from_dict(ckpt["graphs"])
