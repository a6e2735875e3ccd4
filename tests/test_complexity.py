"""Complexity of RandWire against the paper (Tables 2-3, WS(4, 0.75), seeds 1-5) and the CLI."""

import json
import os
import subprocess
import sys

import pytest

from rwdet.analysis.paper import RANDWIRE
from rwdet.analysis.tables import seed_table
from rwdet.complexity import complexity
from rwdet.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["randwire_small", "randwire_c109", "randwire_c154"])
def test_flops_and_params_match_paper_over_seeds_1_to_5(model):
    _, flops, flops_std, params, params_std, _ = RANDWIRE[model]
    t = seed_table(model, gen="ws", gen_params={"k": 4, "p": 0.75})
    assert abs(t["flops_m"] - flops) / flops < 0.02, t
    assert abs(t["params_m"] - params) / params < 0.02, t
    for row in t["rows"]:
        assert abs(row["flops_m"] - flops) <= 3 * flops_std, row
        assert abs(row["params_m"] - params) <= 3 * params_std, row


def test_flops_count_only_conv_and_fc():
    """A tiny model's FLOPs equal the conv + fc multiply-adds counted by hand."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    c = complexity(model, input_size=8)
    assert c["flops"] == 8 * 8 * 4 * 3 * 9
    assert c["params"] == 4 * 3 * 9 + 8


def test_analyze_complexity_cli_json():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "analyze.py"),
            "complexity",
            "randwire_small",
            "--gen",
            "ws",
            "--k",
            "4",
            "--p",
            "0.75",
            "--seed",
            "1",
            "--channels",
            "16",
            "--input-size",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    direct = complexity(
        build_model(
            "randwire_small", gen="ws", gen_params={"k": 4, "p": 0.75}, seed=1, channels=16
        ),
        input_size=64,
    )
    assert result["flops"] == direct["flops"] and result["params"] == direct["params"]


def test_analyze_graph_cli_writes_pngs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "analyze.py"),
            "graph",
            "--model",  # the flag form of the positional model name
            "randwire_small",
            "--nodes",
            "8",
            "--channels",
            "8",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    pngs = sorted(p.name for p in tmp_path.iterdir())
    assert pngs == ["conv3.png", "conv4.png", "conv5.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_dnw_table3_random_graph_row_matches_paper():
    """MobileNetV1-RG x0.225 (DNW Table 3): 55.7 M FLOPs, 1.2 M params."""
    from rwdet.analysis.tables import zoo_markdown, zoo_rows

    rows = zoo_rows(["mobilenetv1_rg_x0225"])
    assert abs(rows[0]["flops_kept"] / 1e6 - 55.7) / 55.7 < 0.02
    assert abs(rows[0]["params_kept"] / 1e6 - 1.2) / 1.2 < 0.05
    assert "mobilenetv1_rg_x0225" in zoo_markdown(rows)
