"""`tools/analyze.py graph` on a model name and on a checkpoint's stored graphs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rwdet.analysis.graph_stats import stage_stats
from rwdet.checkpoint_io import model_record
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


def _detectron2_files(tmp_path):
    """A converted .pkl (tools/convert_cls_to_d2.py's dict) and a Detectron2 checkpoint in the
    layout RwdetCheckpointer.save writes (tensors under 'model', spec and graphs under
    'rwdet', plus the trainer's entries)."""
    from rwdet.d2.convert import convert_rwdet_checkpoint
    from rwdet.d2.weights import save_d2_weights

    model = build_model(
        "randwire_small", channels=8, nodes=6, seed=5, gen="ba", gen_params={"m": 2}
    )
    graphs = get_graphs(model)
    data = convert_rwdet_checkpoint(model_record(model))
    pkl = tmp_path / "converted.pkl"
    save_d2_weights(str(pkl), data)
    pth = tmp_path / "model_final.pth"
    state = {k: torch.from_numpy(v) for k, v in data["model"].items()}
    torch.save({"model": state, "rwdet": data["rwdet"], "iteration": 9, "optimizer": {}}, pth)
    return graphs, pkl, pth


@pytest.mark.slow  # two runs of the tool, one importing detectron2 for the .pkl: ~10 s
def test_graph_command_reads_detectron2_checkpoint_and_pkl(tmp_path):
    graphs, pkl, pth = _detectron2_files(tmp_path)
    for path in (pth, pkl):
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "analyze.py"), "graph", str(path)]
            + ["--out", str(tmp_path / path.stem), "--json"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        stats = json.loads(out.stdout)
        assert set(stats) == set(graphs)
        for name, spec in graphs.items():
            assert stats[name]["edges"] == len(spec.edges)
            assert stats[name]["gen"] == "ba" and stats[name]["seed"] == spec.seed
            assert os.path.isfile(stats[name]["png"])


def test_detectron2_graphs_are_verified_and_loaded_safely(tmp_path):
    import pickle

    from rwdet.analysis.graph_stats import graphs_from_checkpoint
    from rwdet.d2.weights import safe_load_pickle
    from rwdet.run.errors import UserError

    _, pkl, pth = _detectron2_files(tmp_path)
    # An edited edge list (the fingerprint no longer matches) is refused in both layouts.
    data = safe_load_pickle(str(pkl))
    stage = data["rwdet"]["graphs"]["graphs"]["conv3"]
    stage["edges"] = stage["edges"][1:]
    with open(pkl, "wb") as f:
        pickle.dump(data, f)
    ckpt = torch.load(pth, weights_only=True)
    ckpt["rwdet"]["graphs"] = data["rwdet"]["graphs"]
    torch.save(ckpt, pth)
    for path in (pkl, pth):
        with pytest.raises(UserError, match="changed after it was written"):
            graphs_from_checkpoint(str(path))
    # A pickle that would run code is refused, not run.
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "x": os.system}))
    with pytest.raises(UserError, match="refused"):
        graphs_from_checkpoint(str(evil))
    # A Detectron2 file of a backbone without graphs (e.g. the ResNet-50 baseline).
    torch.save({"model": {}, "rwdet": {"model_spec": None, "graphs": None}}, pth)
    with pytest.raises(UserError, match="holds no stage graphs"):
        graphs_from_checkpoint(str(pth))
    torch.save({"model": {}}, pth)
    with pytest.raises(UserError, match="neither a 'graphs' entry"):
        graphs_from_checkpoint(str(pth))
