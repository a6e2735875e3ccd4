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
        + ["--models", "resnet50", "randwire_small+recompute", "randwire_small:dnw"]
        + ["nonexistent_model"]
        + ["--batch", "2", "--size", "32", "--iters", "1", "--warmup", "0", "--rounds", "1"]
        + ["--overrides", '{"channels": 8, "nodes": 8}', "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["results"]}
    # Ratios are against ResNet-50 measured in the same run, for every model that ran.
    base = rows["resnet50"]
    for name in ("randwire_small+recompute", "randwire_small:dnw"):
        row = rows[name]
        assert row["step_s"] > 0 and row["peak_bytes"] > 0
        assert row["step_ratio"] == pytest.approx(row["step_s"] / base["step_s"])
        assert row["peak_ratio"] == pytest.approx(row["peak_bytes"] / base["peak_bytes"])
    assert "not registered" in rows["nonexistent_model"]["note"]
    # The edge-choice share is reported for models that choose edges per step, and only them.
    assert "choice_share" not in rows["resnet50"]
    assert "choice_share" not in rows["randwire_small+recompute"]
    assert 0.0 < rows["randwire_small:dnw"]["choice_share"] < 1.0
    assert data["environment"]["batch"] == 2


def test_edge_choice_counts_learned_wirings_only():
    import importlib.util

    from rwdet.models import build_model

    spec = importlib.util.spec_from_file_location(
        "train_step", os.path.join(ROOT, "benchmarks", "train_step.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def choosers(model):
        return [type(m).__name__ for m in model.modules() if bench.chooses_per_step(m)]

    assert choosers(build_model("mobilenetv1_dnw_x0225", wiring="rg")) == []
    assert set(choosers(build_model("mobilenetv1_dnw_x0225"))) == {"NeuralGraph"}
    assert set(choosers(build_model("resnet50_popup"))) == {"PopupConv2d", "PopupLinear"}
    small = build_model("randwire_small", wiring="dnw", channels=8, nodes=8)
    assert set(choosers(small)) == {"DNWGates"}
    assert choosers(build_model("randwire_small", channels=8, nodes=8)) == []
