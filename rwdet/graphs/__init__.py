"""Random stage graphs (ER, BA, WS), their DAG view, and explicit edge-list artifacts."""

from rwdet.graphs.dag import (
    GENERATORS,
    check_params,
    expected_edges,
    longest_path_length,
    random_dag,
    sinks,
    sources,
    stage_seed,
)
from rwdet.graphs.spec import (
    GraphSpec,
    graphs_fingerprint,
    graphs_from_dict,
    graphs_to_dict,
    load_graphs,
    save_graphs,
)

__all__ = [
    "GENERATORS",
    "GraphSpec",
    "check_params",
    "expected_edges",
    "graphs_fingerprint",
    "graphs_from_dict",
    "graphs_to_dict",
    "load_graphs",
    "longest_path_length",
    "random_dag",
    "save_graphs",
    "sinks",
    "sources",
    "stage_seed",
]
