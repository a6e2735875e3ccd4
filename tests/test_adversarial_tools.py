"""The adversarial inputs of issue 13 against `convert_cls_to_d2.py` and `analyze.py`.

Each case runs the tool's real entry point (its ``__main__`` block, in-process) and expects
what a user should see: exit code 2, one line on stderr naming the bad value, no traceback,
and for the converter no output file.
"""

import copy
import errno
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

import rwdet.atomic
from rwdet.graphs import graphs_fingerprint, graphs_to_dict
from rwdet.models import build_model, get_graphs
from rwdet.run.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONVERT, ANALYZE = "convert_cls_to_d2.py", "analyze.py"
TINY = {"channels": 8, "nodes": 6, "gen": "ws", "gen_params": {"k": 2, "p": 0.5}, "seed": 1}


def run_tool(tool, argv, capsys):
    """The tool as `python tools/<tool> ARGV` runs it: (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [tool, *map(str, argv)])
        mp.delenv("RWDET_DEBUG", raising=False)
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "tools" / tool), run_name="__main__")
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(tool, argv, capsys, *names):
    code, err = run_tool(tool, argv, capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: "), err
    assert "Traceback" not in err[0]
    for name in names:
        assert str(name) in err[0], err
    return err[0]


def contract(model, fingerprint=True):
    """``model`` in the trainer's checkpoint format (with the graph fingerprint it now writes)."""
    graphs = get_graphs(model)
    ckpt = {
        "model": model.state_dict(),
        "model_spec": model.rwdet_spec,
        "graphs": graphs_to_dict(graphs),
        "ema": None,
        "epoch": 1,
        "config": {},
        "metrics": {},
    }
    if fingerprint:
        ckpt["graphs_fingerprint"] = graphs_fingerprint(graphs)
    return ckpt


@pytest.fixture(scope="module")
def ckpt():
    return contract(build_model("randwire_small", **TINY, stem="small", num_classes=10))


def edit_one_edge(graphs_dict):
    """Move the tail of one edge: in-degrees, sources and sinks stay, so tensor shapes fit."""
    d = copy.deepcopy(graphs_dict)
    for stage in d["graphs"].values():
        edges = {tuple(e) for e in stage["edges"]}
        tails = {u for u, _ in edges}
        for u, v in sorted(edges):
            still_tail = any(a == u and b != v for a, b in edges)
            for w in range(v):
                if w != u and w in tails and (w, v) not in edges and still_tail:
                    stage["edges"] = sorted([list(e) for e in edges - {(u, v)}] + [[w, v]])
                    return d
    raise AssertionError("no shape-preserving edit found")


@pytest.fixture
def bad_files(tmp_path):
    """The unreadable "checkpoints" a user can pass by mistake."""
    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(64)}, good)
    files = {
        "directory": tmp_path / "run",
        "empty": tmp_path / "empty.pth",
        "text": tmp_path / "notes.txt",
        "truncated": tmp_path / "truncated.pth",
    }
    files["directory"].mkdir()
    files["empty"].write_bytes(b"")
    files["text"].write_text("epoch 3 top-1 71.2\n")
    files["truncated"].write_bytes(good.read_bytes()[:300])
    return files


# ----------------------------------------------------------------------------- converter


@pytest.mark.parametrize("kind", ["directory", "empty", "text", "truncated"])
def test_convert_refuses_unreadable_checkpoints(tmp_path, bad_files, capsys, kind):
    out = tmp_path / "det.pkl"
    assert_one_line_error(CONVERT, [bad_files[kind], out], capsys, bad_files[kind])
    assert not out.exists()


def test_convert_unknown_model_name(tmp_path, ckpt, capsys):
    bad = {**ckpt, "model_spec": {"name": "randwire_nope", "kwargs": {}}}
    torch.save(bad, tmp_path / "cls.pth")
    out = tmp_path / "det.pkl"
    assert_one_line_error(CONVERT, [tmp_path / "cls.pth", out], capsys, "randwire_nope")
    assert not out.exists()


def test_convert_refuses_existing_output_unless_overwrite(tmp_path, ckpt, capsys):
    torch.save(ckpt, tmp_path / "cls.pth")
    out = tmp_path / "det.pkl"
    out.write_bytes(b"keep me")
    line = assert_one_line_error(CONVERT, [tmp_path / "cls.pth", out], capsys, out, "--overwrite")
    assert "already exists" in line and out.read_bytes() == b"keep me"
    code, _ = run_tool(CONVERT, [tmp_path / "cls.pth", out, "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() != b"keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_convert_output_under_a_file_is_refused(tmp_path, ckpt, capsys):
    torch.save(ckpt, tmp_path / "cls.pth")
    (tmp_path / "weights").write_text("a file, not a folder")
    out = tmp_path / "weights" / "det.pkl"
    assert_one_line_error(CONVERT, [tmp_path / "cls.pth", out], capsys, out)


def test_convert_read_only_output_folder(tmp_path, ckpt, capsys):
    torch.save(ckpt, tmp_path / "cls.pth")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permissions do not apply to this user (root)")
        line = assert_one_line_error(CONVERT, [tmp_path / "cls.pth", folder / "d.pkl"], capsys)
        assert "writable" in line and str(folder) in line
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(
    "where, err", [("mkstemp", errno.EROFS), ("fsync", errno.ENOSPC), ("mkstemp", errno.EACCES)]
)
def test_convert_write_failures_are_one_line(tmp_path, ckpt, capsys, monkeypatch, where, err):
    """A read-only mount, a full disk, a permission denied at write time: one line, no file."""
    torch.save(ckpt, tmp_path / "cls.pth")
    out = tmp_path / "out" / "det.pkl"

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err), str(out.parent))

    target = rwdet.atomic.tempfile if where == "mkstemp" else rwdet.atomic.os
    monkeypatch.setattr(target, where, fail)
    line = assert_one_line_error(CONVERT, [tmp_path / "cls.pth", out], capsys, out.parent)
    assert os.strerror(err) in line
    monkeypatch.undo()
    assert not out.parent.exists() or os.listdir(out.parent) == []


@pytest.mark.parametrize("fingerprint", [True, False], ids=["fingerprinted", "older-file"])
def test_convert_refuses_edited_graphs(tmp_path, ckpt, capsys, fingerprint):
    """Edited edge lists whose tensor shapes still fit: refused by the stored fingerprint, or
    (files written before fingerprints) by the graphs the stored model spec generates."""
    edited = {**ckpt, "graphs": edit_one_edge(ckpt["graphs"])}
    if not fingerprint:
        del edited["graphs_fingerprint"]
    path = tmp_path / "cls.pth"
    torch.save(edited, path)
    out = tmp_path / "det.pkl"
    line = assert_one_line_error(CONVERT, [path, out], capsys, path)
    assert ("changed after it was written" if fingerprint else "holds graphs") in line
    assert not out.exists()


def test_convert_debug_shows_the_traceback(tmp_path, bad_files, monkeypatch):
    """--debug re-raises: the traceback for a bug report instead of the one line."""
    argv = [CONVERT, str(bad_files["text"]), str(tmp_path / "det.pkl"), "--debug"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        runpy.run_path(str(ROOT / "tools" / CONVERT), run_name="__main__")


# ----------------------------------------------------------------------------- analyze


@pytest.mark.parametrize("kind", ["directory", "empty", "text", "truncated"])
def test_analyze_graph_refuses_unreadable_checkpoints(tmp_path, bad_files, capsys, kind):
    argv = ["graph", bad_files[kind], "--out", tmp_path / "png"]
    assert_one_line_error(ANALYZE, argv, capsys, bad_files[kind])


def test_analyze_graph_on_a_file_without_graphs(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    line = assert_one_line_error(ANALYZE, ["graph", path, "--out", tmp_path], capsys, path)
    assert "graphs" in line


def test_analyze_graph_refuses_edited_graphs(tmp_path, ckpt, capsys):
    path = tmp_path / "cls.pth"
    torch.save({**ckpt, "graphs": edit_one_edge(ckpt["graphs"])}, path)
    line = assert_one_line_error(ANALYZE, ["graph", path, "--out", tmp_path / "png"], capsys, path)
    assert "changed after it was written" in line
    assert not (tmp_path / "png").exists()


@pytest.mark.parametrize(
    "argv, names",
    [
        (["complexity", "randwire_nope"], ["randwire_nope"]),
        (["complexity", "randwire_small", "--gen", "ws", "--k", "3"], ["k=3", "even"]),
        (["complexity", "randwire_small", "--input-size", "0"], ["--input-size 0", ">= 1"]),
        (["complexity", "randwire_small", "--input-size", "-8"], ["--input-size -8", ">= 1"]),
        (["damage", "--weights", "w.pth", "--max-images", "0"], ["--max-images 0", ">= 1"]),
    ],
    ids=["unknown-model", "odd-k", "input-size-0", "input-size-negative", "max-images-0"],
)
def test_analyze_bad_values(capsys, argv, names):
    assert_one_line_error(ANALYZE, argv, capsys, *names)


def test_analyze_debug_env_shows_the_traceback(tmp_path, bad_files, capsys, monkeypatch):
    """RWDET_DEBUG=1 (for runs whose command line cannot change) re-raises instead."""
    monkeypatch.setenv("RWDET_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", [ANALYZE, "graph", str(bad_files["text"])])
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        runpy.run_path(str(ROOT / "tools" / ANALYZE), run_name="__main__")
