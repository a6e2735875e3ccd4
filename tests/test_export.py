"""TorchScript and ONNX export (``tools/export.py``, issue 14 Deliver 3).

RandWire, DNW and edge-popup models are traced and exported through the tool's real entry point,
reloaded from the written file and matched against eager on the check image; a failed export
leaves no file; bad inputs are one line and exit code 2.
"""

import importlib.util
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rwdet.checkpoint_io import model_record
from rwdet.models import build_model
from rwdet.nn.aggregate import WeightedSum, exporting, weighted_sum

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation
ROOT = Path(__file__).resolve().parents[1]
TOOL = "export.py"
TINY = {"channels": 8, "nodes": 6, "num_classes": 10, "stem": "small", "seed": 1}
MODELS = {
    "randwire": ("randwire_small", dict(TINY, in_channels=1)),  # on a Fashion-MNIST image
    "dnw": ("randwire_small", dict(TINY, wiring="dnw")),  # on a tree-crown photo
    "popup": ("randwire_small", dict(TINY, wiring="popup")),
    "mobilenet_dnw": (
        "mobilenetv1_dnw_small_x0225",
        {"num_classes": 10, "node_multiplier": 0.1, "stem": "small"},
    ),
}


def tool_module():
    spec = importlib.util.spec_from_file_location("rwdet_export_tool", ROOT / "tools" / TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(argv, capsys, tool=TOOL):
    """The tool as `python tools/<tool> ARGV` runs it: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [tool, *map(str, argv)])
        mp.delenv("RWDET_DEBUG", raising=False)
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "tools" / tool), run_name="__main__")
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err.strip().splitlines()


def write_checkpoint(path, model, data=None, test_size=32):
    torch.save(
        {
            **model_record(model),
            "config": {"data": {"name": data, "test_size": test_size}},
        },
        path,
    )


def assert_matches(got, want):
    got, want = np.asarray(got), want.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_traced_aggregation_is_the_autograd_op_exactly():
    torch.manual_seed(0)
    zs = [torch.randn(2, 5, 4, 4) for _ in range(3)]
    w = torch.rand(3)

    seen = []

    class Agg(torch.nn.Module):
        def forward(self, a, b, c):
            seen.append(exporting())
            return weighted_sum(w, [a, b, c])

    traced = torch.jit.trace(Agg(), tuple(zs), check_trace=False)
    assert seen == [True] and not exporting()
    assert torch.equal(traced(*zs), WeightedSum.apply(w, *zs))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_torchscript_and_onnx_match_eager(kind, tmp_path, capsys):
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    name, kwargs = MODELS[kind]
    model = build_model(name, **kwargs).eval()
    ckpt = tmp_path / f"{kind}.pth"
    in_chans = kwargs.get("in_channels", 3)
    write_checkpoint(ckpt, model, data="fashion_mnist" if in_chans == 1 else None)
    x, _ = tool_module().load_image(None, 32, in_chans, "fashion_mnist" if in_chans == 1 else None)
    with torch.no_grad():
        want = model(x)

    ts, ox = tmp_path / "m.pt", tmp_path / "m.onnx"
    code, out, err = run_tool([ckpt, "--format", "torchscript", "--out", ts], capsys)
    assert code == 0, err
    assert "max abs difference to eager" in out
    reloaded = torch.jit.load(str(ts))
    with torch.no_grad():
        assert_matches(reloaded(x), want)

    code, out, err = run_tool([ckpt, "--format", "onnx", "--out", ox], capsys)
    assert code == 0, err
    proto = onnx.load(str(ox))
    onnx.checker.check_model(proto)
    evaluator = ReferenceEvaluator(proto)
    assert_matches(evaluator.run(None, {evaluator.input_names[0]: x.numpy()})[0], want)
    assert sorted(os.listdir(tmp_path)) == sorted([ckpt.name, ts.name, ox.name])  # no temp files


def test_failed_check_or_export_leaves_no_file(tmp_path, capsys, monkeypatch):
    model = build_model("randwire_small", **TINY).eval()
    ckpt = tmp_path / "m.pth"
    write_checkpoint(ckpt, model)
    out = tmp_path / "m.pt"
    load = torch.jit.load

    def wrong(*args, **kwargs):  # an exported model that does not reproduce eager
        m = load(*args, **kwargs)
        return lambda x: m(x) + 1.0

    monkeypatch.setattr(torch.jit, "load", wrong)
    code, _, err = run_tool([ckpt, "--format", "torchscript", "--out", out], capsys)
    assert code == 1 and "export check failed" in err[0] and "nothing written" in err[0], err
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failure")

    out.write_bytes(b"an older export")  # a failed export keeps what was there
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failure"):
        run_tool([ckpt, "--format", "onnx", "--out", out], capsys)
    assert out.read_bytes() == b"an older export"
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.pth"]


def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    ckpt = tmp_path / "m.pth"
    write_checkpoint(ckpt, build_model("randwire_small", **TINY))
    out = tmp_path / "x.pt"
    cases = [
        (["no_such_model", "--format", "onnx", "--out", out], "no_such_model"),
        ([tmp_path / "missing.pth", "--format", "onnx", "--out", out], "missing.pth"),
        ([text, "--format", "torchscript", "--out", out], "notes.pth"),
        ([ckpt, "--format", "onnx", "--out", out, "--image", text], "--image"),
        ([ckpt, "--format", "onnx", "--out", out, "--in-chans", "1"], "--in-chans 1"),
        (["randwire_small", "--format", "onnx", "--out", out, "--input-size", "0"], "--input-size"),
        (["randwire_small", "--format", "onnx", "--out", tmp_path], "directory"),
        (["randwire_small", "--format", "onnx", "--out", out, "--model-kwargs", "{"], "JSON"),
        (["randwire_small", "--format", "tflite", "--out", out], "tflite"),
    ]
    for argv, name in cases:
        code, _, err = run_tool(argv, capsys)
        assert code == 2, (argv, err)
        assert len(err) == 1 and "error:" in err[0] and name in err[0], (argv, err)
    assert not out.exists()
