"""Summary statistics of stage graphs (RandWire §4.1 looks at degrees; Figure 4 at shape)."""

from __future__ import annotations

import networkx as nx

from rwdet.checkpoint_io import checked_graphs, load_graph_record
from rwdet.graphs import GraphSpec, longest_path_length
from rwdet.run.errors import UserError


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
    """Stage graphs stored in an rwdet file (no model is built): a classification checkpoint,
    a Detectron2 checkpoint (``model_final.pth``) or a converted ``.pkl``.

    Loaded safely and checked against the stored fingerprint and model spec, so a plot never
    shows an edited graph as the trained one; a bad file is a one-line ``UserError`` naming it.
    """
    record = load_graph_record(path)
    if not record.get("graphs"):
        raise UserError(f"{path!r} holds no stage graphs (a model without random graphs?)")
    from rwdet.models.artifact import upgrade_spec

    spec = upgrade_spec(record.get("model_spec"))  # keywords renamed since it was written
    return checked_graphs(record, repr(path), spec=spec if isinstance(spec, dict) else None)
