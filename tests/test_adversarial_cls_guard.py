"""Issue 13, classification: graphs checked on every load, a divergence guard that keeps the
good checkpoint, previous runs never destroyed, config.yaml only from a validated run.

Every case goes through the real tool (``tools/train_cls.py``'s ``main``) on the tiny
real-image set of test_cls_train, starting from a copy of one short good run.
"""

import copy
import os
import shutil

import pytest
import torch
from test_cls_config import load_tool
from test_cls_data import make_image_folder
from test_cls_train import records, tiny_args

from classification.checkpoint import load_checkpoint, move_previous_run
from classification.config import DEFAULTS
from classification.divergence import DivergenceError, DivergenceGuard

FAST = ["train.complexity", "false", "train.precise_bn", "0"]


def run_tool(data, out, capsys, epochs=3, extra=()):
    code = load_tool().main(tiny_args(data, out, epochs=epochs, extra=[*FAST, *extra]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet_layout"))
    return root, make_image_folder(root, train_per_class=34)


@pytest.fixture(scope="module")
def good_run(dataset, tmp_path_factory):
    """Two epochs of normal training with the most trigger-happy guard (one spike stops it)."""
    data, _ = dataset
    out = str(tmp_path_factory.mktemp("good"))
    code = load_tool().main(
        tiny_args(data, out, epochs=2, extra=[*FAST, "train.divergence_patience", "1"])
    )
    assert code == 0, "the divergence guard fired on a normal run"
    return data, out


@pytest.fixture
def run_copy(good_run, tmp_path):
    data, out = good_run
    copy_ = str(tmp_path / "run")
    shutil.copytree(out, copy_)
    return data, copy_


def edited_graphs(graphs: dict) -> dict:
    """Re-route one edge to another source node: every node keeps its in-degree and every
    source keeps an out-edge, so all the tensor shapes still fit the edited graph."""
    graphs = copy.deepcopy(graphs)
    for stage in graphs["graphs"].values():
        edges = [list(e) for e in stage["edges"]]
        out_degree = {}
        for a, _ in edges:
            out_degree[a] = out_degree.get(a, 0) + 1
        for i, (a, b) in enumerate(edges):
            sources = {x for x, y in edges if y == b}
            new = [x for x in range(b) if x not in sources and out_degree.get(x)]
            if out_degree[a] > 1 and new:
                edges[i] = [new[0], b]
                stage["edges"] = edges
                return graphs
    raise AssertionError("no edge can be re-routed")


def test_good_run_stores_the_graph_fingerprint(good_run):
    _, out = good_run
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert len(ckpt["graphs_fingerprint"]) > 8 and ckpt["guard"]["loss_level"] > 0


def test_edited_graph_is_refused_on_resume_and_on_eval_only(run_copy, capsys):
    data, out = run_copy
    last = os.path.join(out, "last.pth")
    ckpt = load_checkpoint(last)
    ckpt["graphs"] = edited_graphs(ckpt["graphs"])
    torch.save(ckpt, last)
    before = read(last)
    code, _, err = run_tool(data, out, capsys)
    assert code == 2 and "its graphs were changed after it was written" in err, err
    assert err.count("\n") == 1 and read(last) == before
    weights = os.path.join(out, "edited.pth")
    shutil.copy(last, weights)
    code, stdout, err = run_tool(data, out, capsys, extra=["--eval-only", "--weights", weights])
    assert code == 2 and "its graphs were changed" in err and "top-1" not in stdout, err
    # A file from before fingerprints were stored: the requested model's graphs still decide.
    del ckpt["graphs_fingerprint"]
    torch.save(ckpt, weights)
    code, stdout, err = run_tool(data, out, capsys, extra=["--eval-only", "--weights", weights])
    assert code == 2 and "but the requested model" in err and "top-1" not in stdout, err
    ckpt = load_checkpoint(os.path.join(out, "best.pth"))
    del ckpt["graphs_fingerprint"]
    torch.save(ckpt, weights)
    code, stdout, err = run_tool(data, out, capsys, extra=["--eval-only", "--weights", weights])
    assert code == 0 and "top-1" in stdout, err  # unedited old file: still evaluated


def test_huge_lr_on_resume_keeps_last_and_best_byte_identical(run_copy, capsys):
    data, out = run_copy
    files = {n: read(os.path.join(out, n)) for n in ("last.pth", "best.pth")}
    # A checkpoint is due after every step: the first diverged step must not be saved.
    extra = ["optim.lr", "1.0e+6", "train.checkpoint_period", "1"]
    code, _, err = run_tool(data, out, capsys, extra=extra)
    assert code == 2 and err.count("\n") == 1, err
    assert "diverged at iteration 27: a weight reached magnitude" in err, err
    assert "running level" in err and "lower the learning rate" in err
    assert f"last good checkpoint is kept: {os.path.join(out, 'last.pth')}" in err
    assert {n: read(os.path.join(out, n)) for n in files} == files


def test_loss_spike_stops_the_run_before_it_saves(run_copy, capsys):
    """lr 30 (600x) on resume: the loss leaps 50x but the weights stay small for a while;
    three spiking windows in a row stop it (the normal run above never spiked once)."""
    data, out = run_copy
    before = read(os.path.join(out, "last.pth"))
    extra = ["--lr", "30", "train.divergence_max_weight", "0"]
    code, _, err = run_tool(data, out, capsys, extra=extra)
    assert code == 2, err
    assert "is above its running level" in err and "for 3 logged windows" in err, err
    assert read(os.path.join(out, "last.pth")) == before
    assert [r["iteration"] for r in records(out, "train")][-3:] == [28, 30, 32]


def test_no_resume_moves_the_previous_run_aside(run_copy, capsys):
    data, out = run_copy
    old = {n: read(os.path.join(out, n)) for n in ("last.pth", "best.pth", "config.yaml")}
    old_metrics = read(os.path.join(out, "metrics.jsonl"))
    code, stdout, err = run_tool(data, out, capsys, epochs=1, extra=["--no-resume"])
    assert code == 0, err
    (stamp,) = os.listdir(os.path.join(out, "previous"))
    aside = os.path.join(out, "previous", stamp)
    assert f"moved its last.pth, best.pth, metrics.jsonl, config.yaml, tb to {aside}" in stdout
    assert {n: read(os.path.join(aside, n)) for n in old} == old
    assert read(os.path.join(aside, "metrics.jsonl")) == old_metrics
    assert load_checkpoint(os.path.join(out, "last.pth"))["iteration"] == 13  # the new run
    assert {r["epoch"] for r in records(out, "eval")} == {1}  # only the new run's records


def test_run_that_dies_on_a_bad_value_writes_no_config(run_copy, capsys):
    data, out = run_copy
    files = {n: read(os.path.join(out, n)) for n in ("config.yaml", "metrics.jsonl")}
    # Found only once the sampler is built: more images per batch than in the training set.
    code, _, err = run_tool(data, out, capsys, extra=["--batch-size", "512"])
    assert code == 2 and "smaller than one batch" in err, err
    assert {n: read(os.path.join(out, n)) for n in files} == files


def test_eval_only_refuses_nan_weights(run_copy, capsys):
    data, out = run_copy
    weights = os.path.join(out, "nan.pth")
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name][0] = float("nan")
    torch.save(ckpt, weights)
    code, stdout, err = run_tool(data, out, capsys, extra=["--eval-only", "--weights", weights])
    assert code == 2 and "weights hold NaN/Inf" in err and name in err, err
    assert "top-1" not in stdout


def test_guard_levels_spikes_and_non_finite_values():
    guard = DivergenceGuard(DEFAULTS["train"])
    for loss in (2.3, 2.0, 1.5, 1.2):  # a normal decreasing loss sets the level
        guard.check_loss(loss, 0, "kept")
    assert 1.5 < guard.level < 2.3 and guard.streak == 0
    model = torch.nn.Linear(2, 2)
    guard.check_before_save(model, 9, "kept")
    guard.check_loss(40.0, 10, "kept")  # one spike: the run goes on, but saves are refused
    with pytest.raises(DivergenceError, match="iteration 11: the loss 40 is above .* when a"):
        guard.check_before_save(model, 10, "kept")
    guard.check_loss(1.1, 11, "kept")  # back to normal: the streak ends
    guard.check_before_save(model, 11, "kept")
    restored = DivergenceGuard(DEFAULTS["train"])
    restored.load_state_dict(guard.state_dict())
    assert restored.level == guard.level  # a resumed run keeps the good run's level
    with pytest.raises(DivergenceError, match="the loss is nan .* To fix: lower the learning"):
        guard.check_loss(float("nan"), 12, "kept")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(DivergenceError, match="iteration 14: the weights became NaN/Inf"):
        guard.check_weights(model, 13, "kept")


def test_move_previous_run_keeps_every_earlier_run(tmp_path):
    out = str(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert move_previous_run(out) is None  # no checkpoint: nothing to protect, nothing moved
    for run in ("a", "b"):  # two fresh starts within one second get two folders
        (tmp_path / "best.pth").write_text(run)
        dest, names = move_previous_run(out)
        assert names == ["best.pth", "metrics.jsonl"][: 2 if run == "a" else 1]
    kept = sorted(os.listdir(tmp_path / "previous"))
    assert len(kept) == 2  # "<time>" and "<time>-2" when both fell in the same second
    assert [read(tmp_path / "previous" / k / "best.pth") for k in kept] == [b"a", b"b"]
