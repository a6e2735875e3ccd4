"""`tools/analyze.py graph` on a model name and on a checkpoint's stored graphs."""

import json
import os
import subprocess
import sys

import torch

from rwdet.analysis.graph_stats import stage_stats
from rwdet.graphs import GraphSpec, graphs_to_dict
from rwdet.models import build_model, get_graphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stage_stats_on_hand_made_graph():
    s = stage_stats(GraphSpec(n=4, edges=((0, 1), (1, 2), (0, 2))))
    assert (s["edges"], s["sources"], s["sinks"], s["longest_path"]) == (3, 2, 2, 2)
    assert s["max_in_degree"] == 2 and s["clustering"] == 0.75


def test_graph_command_reads_checkpoint_graphs(tmp_path):
    model = build_model("randwire_small", channels=8, nodes=8, seed=3)
    graphs = get_graphs(model)
    ckpt = tmp_path / "last.pth"
    torch.save({"model": model.state_dict(), "graphs": graphs_to_dict(graphs)}, ckpt)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "analyze.py"), "graph", str(ckpt)]
        + ["--out", str(tmp_path / "png"), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    stats = json.loads(out)
    assert set(stats) == set(graphs)
    for name, spec in graphs.items():
        assert stats[name]["edges"] == len(spec.edges)
        assert stats[name]["seed"] == spec.seed
        assert os.path.isfile(stats[name]["png"])
