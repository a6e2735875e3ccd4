"""``tools/visualize_det.py`` (the PNG `make demo` shows): the detector's boxes on a real
held-out tree-crown tile next to the annotated boxes; bad requests are one line, exit 2."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import run_tool as export_run_tool
from test_export_detector import det_weights  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOOL = "visualize_det.py"


def run_tool(argv, capsys):
    return export_run_tool(argv, capsys, tool=TOOL)


def test_png_shows_predictions_next_to_ground_truth(det_weights, tmp_path, capsys):  # noqa: F811
    from detectron2.data import DatasetCatalog

    config = ROOT / "configs" / "frcnn_randwire_demo.yaml"
    base = ["--config-file", config, "MODEL.WEIGHTS", det_weights, "MODEL.FPN.OUT_CHANNELS", "16"]
    png = tmp_path / "boxes.png"
    code, out, err = run_tool([*base, "--index", "2", "--score-thresh", "0", "--out", png], capsys)
    assert code == 0, err
    record = DatasetCatalog.get("treecrowns_val")[2]
    assert f"{Path(record['file_name']).name} of treecrowns_val" in out
    assert f"| {len(record['annotations'])} annotated" in out
    canvas = np.asarray(Image.open(png))
    photo = np.asarray(Image.open(record["file_name"]).convert("RGB"))
    assert canvas.shape == (photo.shape[0], 2 * photo.shape[1], 3)
    left, right = canvas[:, : photo.shape[1]], canvas[:, photo.shape[1] :]
    assert (left != photo).any() and (right != photo).any()  # boxes drawn on both halves
    assert not (left == right).all()  # predictions are not the annotations

    for argv, says in [
        (["--split", "nope"], "--split 'nope' is not a registered dataset"),
        (["--index", "999"], "--index 999: 'treecrowns_val' has"),
        (["--score-thresh", "2"], "--score-thresh 2.0 is out of range"),
    ]:
        code, _, err = run_tool([*base, *argv, "--out", png], capsys)
        assert code == 2 and len(err) == 1 and says in err[0], err
    code, _, err = run_tool(["--config-file", config, "--out", png], capsys)
    assert code == 2 and "MODEL.WEIGHTS is empty" in err[0]
