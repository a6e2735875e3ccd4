"""Exporting the Detectron2 RandWire detector (``tools/export.py --config-file``, issue 14):
the written TorchScript and ONNX files, reloaded here on their own, give the eager detector's
boxes, scores and classes on a real tree-crown photo."""

import runpy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from test_export import run_tool, tool_module

from rwdet.models import build_model, save_model

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def det_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det_export")
    torch.manual_seed(0)
    model = build_model("randwire_small", channels=8, nodes=5, seed=1, num_classes=10)
    save_model(model, tmp / "cls.pth")
    convert = runpy.run_path(str(ROOT / "tools" / "convert_cls_to_d2.py"))["main"]
    assert convert([str(tmp / "cls.pth"), str(tmp / "det.pkl")]) == 0
    return tmp / "det.pkl"


def test_detector_exports_reload_and_match_eager(det_weights, tmp_path, capsys):
    opts = ["--config-file", ROOT / "configs" / "frcnn_randwire_demo.yaml", "MODEL.WEIGHTS",
            det_weights, "MODEL.FPN.OUT_CHANNELS", "16", "--input-size", "128"]  # fmt: skip
    ts, ox = tmp_path / "det.pt", tmp_path / "det.onnx"
    for fmt, out in (("torchscript", ts), ("onnx", ox)):
        code, stdout, err = run_tool([*opts, "--format", fmt, "--out", out], capsys)
        assert code == 0, err
        assert "Detectron2 model" in stdout and "max abs difference to eager" in stdout

    tool = tool_module()
    torch.manual_seed(0)  # the heads not in the weights file start as the tool's did
    adapter, _ = tool.load_detector(tool.parse_args([str(a) for a in [*opts, "--format",
                                    "onnx", "--out", tmp_path / "unused"]]))  # fmt: skip
    inputs = adapter.flattened_inputs
    with torch.no_grad():
        want = [t.numpy() for t in adapter(*inputs)]  # boxes, classes, scores, image size
    assert want[0].shape[1] == 4 and len(want[0]) > 0  # a real photo, an untrained head: boxes

    with torch.no_grad():
        got = [t.numpy() for t in torch.jit.load(str(ts))(*inputs)]
    proto = onnx.load(str(ox))
    onnx.checker.check_model(proto)
    ev = ReferenceEvaluator(proto)
    got_onnx = ev.run(None, dict(zip(ev.input_names, (t.numpy() for t in inputs))))
    for exported in (got, got_onnx):
        assert [a.shape for a in exported] == [w.shape for w in want]
        for a, w in zip(exported, want):
            np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4 * np.abs(want[0]).max())
