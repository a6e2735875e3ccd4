"""Checkpoints: atomic writes, weights_only loading, RNG round trip, mismatch errors."""

import os
import random

import numpy as np
import pytest
import torch

from classification import checkpoint as ck
from rwdet.graphs import graphs_to_dict
from rwdet.models import build_model, get_graphs

TINY = {"channels": 8, "nodes": 6, "stem": "small", "head_channels": 16, "num_classes": 3}


def tiny_ckpt(**overrides):
    kw = {**TINY, "gen": "ws", "seed": 1, **overrides}
    model = build_model("randwire_small", **kw)
    return {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(get_graphs(model)),
        "ema": None,
        "iteration": 3,
    }


def test_atomic_save_and_weights_only_load(tmp_path):
    path = str(tmp_path / "sub" / "last.pth")
    obj = tiny_ckpt()
    ck.atomic_save(obj, path)
    assert os.listdir(tmp_path / "sub") == ["last.pth"]  # no temp file left behind
    loaded = ck.load_checkpoint(path)
    assert loaded["model_spec"] == obj["model_spec"] and loaded["iteration"] == 3
    # Rebuilding from the stored edge lists reproduces the model exactly.
    from rwdet.graphs import graphs_from_dict

    spec = loaded["model_spec"]
    model = build_model(spec["name"], graphs=graphs_from_dict(loaded["graphs"]), **spec["kwargs"])
    model.load_state_dict(loaded["model"])


def test_failed_save_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "last.pth")
    ck.atomic_save({"model": {}, "model_spec": {}, "graphs": {}, "v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ck.atomic_save({"x": Unpicklable()}, path)
    assert ck.load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickles_are_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "model_spec": {}, "graphs": {}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        ck.load_checkpoint(path)


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(str(tmp_path / "none.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="unreadable or corrupt|weights_only"):
        ck.load_checkpoint(str(bad))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an rwdet classification checkpoint"):
        ck.load_checkpoint(str(tmp_path / "other.pth"))


def test_spec_mismatch_errors_name_the_difference():
    ckpt = tiny_ckpt()
    spec = dict(ckpt["model_spec"])
    ck.check_model_spec(ckpt, spec, "x.pth")  # identical: fine
    other = {"name": spec["name"], "kwargs": {**spec["kwargs"], "channels": 16}}
    with pytest.raises(ck.CheckpointMismatchError, match="channels: checkpoint 8, requested 16"):
        ck.check_model_spec(ckpt, other, "x.pth")
    graph = {"name": spec["name"], "kwargs": {**spec["kwargs"], "seed": 2}}
    with pytest.raises(ck.CheckpointMismatchError, match="graph fingerprint"):
        ck.check_model_spec(ckpt, graph, "x.pth")
    arch = {"name": "randwire_c109", "kwargs": spec["kwargs"]}
    with pytest.raises(ck.CheckpointMismatchError, match="model: checkpoint 'randwire_small'"):
        ck.check_model_spec(ckpt, arch, "x.pth")


def test_eval_only_ignores_training_only_keywords():
    ckpt = tiny_ckpt(dropout=0.2, edge_drop=0.1)
    spec = {"name": "randwire_small", "kwargs": {**TINY, "gen": "ws", "seed": 1}}
    ck.check_model_spec(ckpt, spec, "x.pth", eval_only=True)
    with pytest.raises(ck.CheckpointMismatchError, match="edge_drop"):
        ck.check_model_spec(ckpt, spec, "x.pth")


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    state = ck.rng_state()
    path = str(tmp_path / "rng.pth")
    ck.atomic_save({"model": {}, "model_spec": {}, "graphs": {}, "rng": [state]}, path)
    expected = (random.random(), np.random.normal(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.set_rng_state(ck.load_checkpoint(path)["rng"][0])
    got = (random.random(), np.random.normal(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_latest_checkpoint(tmp_path):
    assert ck.latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "last.pth").write_bytes(b"x")
    assert ck.latest_checkpoint(str(tmp_path)).endswith("last.pth")


def test_temp_files_of_killed_saves_are_removed(tmp_path):
    kept = ["last.pth", "best.pth", "notes.tmp", ".other.tmp"]
    stale = [".last.pthab12cd.tmp", ".best.pth_x9.tmp"]
    for f in kept + stale:
        (tmp_path / f).write_bytes(b"x")
    assert sorted(ck.remove_stale_temp_files(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert ck.remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_unwrap():
    model = torch.nn.Linear(2, 2)
    wrapped = type("Compiled", (torch.nn.Module,), {})()
    wrapped._orig_mod = model
    assert ck.unwrap(wrapped) is model and ck.unwrap(model) is model
