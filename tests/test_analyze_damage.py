"""`tools/analyze.py damage` on a checkpoint written by the real trainer."""

import json
import os
import subprocess
import sys

import pytest
from test_cls_data import make_image_folder
from test_cls_train import tiny_args, tiny_cfg

from classification import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_damage_tool_on_trained_checkpoint(tmp_path):
    data = str(tmp_path / "data")
    make_image_folder(data)
    out = str(tmp_path / "run")
    trainer.main(tiny_cfg(*tiny_args(data, out, epochs=1)))
    ckpt = os.path.join(out, "last.pth")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "analyze.py"), "damage"]
        + ["--weights", ckpt, "--out", str(tmp_path / "dmg"), "--limit", "3"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "baseline top-1" in res.stdout
    study = json.loads((tmp_path / "dmg" / "damage.json").read_text())
    stages = {r["stage"] for r in study["results"]}
    assert stages == {"conv3", "conv4", "conv5"}
    # --limit 3 per stage: the first three nodes of each stage (nodes come before edges).
    assert len(study["results"]) == 9 and all(r["kind"] == "node" for r in study["results"])
    assert (tmp_path / "dmg" / "damage.png").read_bytes()[:4] == b"\x89PNG"
