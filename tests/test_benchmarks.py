"""The benchmark harness runs end to end on a tiny configuration and reports ratios."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_step_benchmark_tiny(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py")]
        + ["--models", "resnet50", "randwire_small+recompute", "nonexistent_model"]
        + ["--batch", "2", "--size", "32", "--iters", "1", "--warmup", "0", "--rounds", "1"]
        + ["--overrides", '{"channels": 8, "nodes": 8}', "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["results"]}
    assert rows["resnet50"]["step_ratio"] == 1.0
    assert rows["randwire_small+recompute"]["peak_bytes"] > 0
    assert "not registered" in rows["nonexistent_model"]["note"]
    assert data["environment"]["batch"] == 2
