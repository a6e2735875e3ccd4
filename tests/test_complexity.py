"""Complexity of RandWire against the paper (Tables 2-3, WS(4, 0.75), seeds 1-5) and the CLI."""

import contextlib
import functools
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from rwdet.analysis.paper import RANDWIRE
from rwdet.analysis.tables import seed_table
from rwdet.complexity import complexity
from rwdet.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------------------ analyze.py complexity --zoo/--table
# The real zoo and tables build every registered model at 224 px (minutes on 2 cores); the CLI's
# own code runs here on two tiny registered models, one dense and one edge-popup.
TINY = {"channels": 8, "nodes": 6, "num_classes": 10, "head_channels": 32}


@pytest.fixture
def tiny_zoo(monkeypatch):
    import rwdet.models
    from rwdet.models.registry import MODELS

    small = MODELS["randwire_small"]
    monkeypatch.setitem(MODELS, "tiny_static", functools.partial(small, **TINY))
    monkeypatch.setitem(MODELS, "tiny_popup", functools.partial(small, wiring="popup", **TINY))
    monkeypatch.setattr(rwdet.models, "list_models", lambda: ["tiny_static", "tiny_popup"])


def analyze(*argv) -> str:
    spec = importlib.util.spec_from_file_location(
        "analyze", os.path.join(ROOT, "tools", "analyze.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert tool.main(list(argv)) == 0
    return out.getvalue()


def test_analyze_complexity_zoo_lists_every_registered_model_dense_and_kept(tiny_zoo):
    from rwdet.analysis.tables import zoo_markdown

    rows = json.loads(analyze("complexity", "--zoo", "--json", "--input-size", "32"))
    assert [r["model"] for r in rows] == ["tiny_static", "tiny_popup"]
    static, popup = rows
    dense = complexity(build_model("tiny_static"), input_size=32)  # fvcore, at --input-size
    assert static["flops_dense"] == static["flops_kept"] == dense["flops"]
    assert static["params_dense"] == static["params_kept"] == dense["params"]
    # edge-popup keeps k = 30% of each layer's weights: the same dense network, far less kept.
    assert popup["flops_dense"] == dense["flops"]
    assert 0.2 < popup["flops_kept"] / popup["flops_dense"] < 0.4
    assert 0.1 < popup["params_kept"] / popup["params_dense"] < 0.4
    text = analyze("complexity", "--zoo", "--input-size", "32")
    assert text.strip() == zoo_markdown(rows)
    assert len(text.strip().splitlines()) == 2 + len(rows)


def test_analyze_complexity_table_seeds_1_to_5_next_to_the_paper(tiny_zoo, monkeypatch):
    import statistics

    from rwdet.analysis import paper, tables

    monkeypatch.setattr(tables, "RANDWIRE", {"tiny_static@32": (32, 80.0, 6.0, 0.5, 0.04, "T")})
    monkeypatch.setattr(paper, "DNW_TABLE3", {"tiny_popup": (0.002, 0.02)})
    out = json.loads(analyze("complexity", "--table", "--json"))
    (t,) = out["randwire"]
    assert (t["model"], t["input_size"], t["source"]) == ("tiny_static", 32, "T")
    assert [r["seed"] for r in t["rows"]] == [1, 2, 3, 4, 5]
    seed1 = complexity(build_model("tiny_static", seed=1), input_size=32)
    assert t["rows"][0]["flops_m"] == seed1["flops"] / 1e6
    assert t["rows"][0]["params_m"] == seed1["params"] / 1e6
    for key in ("flops_m", "params_m"):
        values = [r[key] for r in t["rows"]]
        assert t[key] == pytest.approx(statistics.mean(values))
        # The sample std, as the paper reports it.
        assert t[key + "_std"] == pytest.approx(statistics.stdev(values))
    assert t["paper"] == {"flops_m": 80.0, "flops_m_std": 6.0, "params_m": 0.5,
                          "params_m_std": 0.04}  # fmt: skip
    (d,) = out["dnw_table3"]
    assert (d["model"], d["paper_params_m"], d["paper_flops_m"]) == ("tiny_popup", 0.002, 0.02)
    assert d["flops_kept"] < d["flops_dense"]
    text = analyze("complexity", "--table")
    assert "| tiny_static | 32 | T | mean±std | 80±6 | 0.5±0.04 |" in text
    assert f"| tiny_static | 32 | | 1 | {seed1['flops'] / 1e6:.1f} |" in text
    assert "DNW Table 3 (at initialisation)" in text and "| 0.002 | 0.02 |" in text


def test_analyze_complexity_method_chooses_the_count(monkeypatch):
    """--method traced reaches fvcore's count (stubbed here to tell the two apart); the default
    is the analytic one, and both agree on the real model."""
    import rwdet.complexity.traced as traced

    argv = ("complexity", "randwire_small", "--channels", "8", "--nodes", "6")
    argv = (*argv, "--input-size", "32", "--json")
    analytic = json.loads(analyze(*argv))
    reference = json.loads(analyze(*argv, "--method", "traced"))
    assert (analytic["flops"], analytic["activations"]) == (
        reference["flops"],
        reference["activations"],
    )
    monkeypatch.setattr(traced, "count_flops", lambda model, x: 12345)
    assert json.loads(analyze(*argv, "--method", "traced"))["flops"] == 12345
    assert json.loads(analyze(*argv))["flops"] == analytic["flops"] != 12345


# ------------------------------------------------- node-op width matching (RandWire Figure 6)
def _macs(channels: int, node_op: str, size: int) -> int:
    from rwdet.complexity.width import meta_flops
    from rwdet.models.randwire import RandWire

    return meta_flops(
        lambda: RandWire(regime="small", channels=channels, nodes=8, seed=1, node_op=node_op), size
    )


@pytest.mark.parametrize("op", ["conv", "maxpool", "avgpool"])
def test_node_op_width_keeps_flops_nearest_the_sepconv_network(op):
    """§4.1: "We adjust the factor C to keep the complexity". rwdet re-chooses C (without an
    explicit width) so the network's FLOPs are the nearest to the sepconv network's; one step of
    C moves them by 3-7% at these widths, so the nearest C lands within 3.5% of the target.
    N = 8 keeps the search fast; the rule does not depend on N."""
    from rwdet.complexity.width import PROBE_SIZE

    with torch.device("meta"):
        c = build_model("randwire_small", nodes=8, node_op=op).stage_channels["conv2"]
    assert c != 78  # sepconv's C would be far off: a 3x3 conv costs ~8x, pool + 1x1 a little less
    for size in (PROBE_SIZE, 224):  # the search's probe size and the paper's input size
        target = _macs(78, "sepconv", size)
        gap = {w: abs(_macs(w, op, size) - target) for w in (c - 1, c, c + 1)}
        assert gap[c] == min(gap.values()), (size, gap)
        assert gap[c] / target < 0.035, (size, gap)


@pytest.mark.parametrize("op", ["sepconv", "conv", "maxpool", "avgpool"])
def test_width_search_counts_flops_as_fvcore_does(op):
    """The search's meta-device count equals fvcore's traced count for every op: pooling and
    BN cost nothing in both, so the matched width matches the FLOPs fvcore would report."""
    from rwdet.complexity.width import meta_flops

    model = build_model("randwire_small", gen="er", node_op=op, **TINY)
    flops = complexity(model, input_size=32, method="traced")["flops"]
    assert meta_flops(lambda: build_model("randwire_small", gen="er", node_op=op, **TINY), 32) == (
        flops
    )


def test_matched_width_is_generic_and_memoised():
    """The matcher takes any builder (here a plain two-conv net whose FLOPs grow with its
    width): it returns the width nearest the reference's FLOPs, and a key memoises it."""
    from torch import nn

    from rwdet.complexity import matched_width, meta_flops
    from rwdet.complexity.width import PROBE_SIZE

    def net(width: int, k: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, width, k, padding=k // 2), nn.Conv2d(width, 8, 1))

    builds = []

    def build(w: int) -> nn.Module:
        builds.append(w)
        return net(w, 5)

    w = matched_width(build, lambda: net(40, 3), 40, key=("two-conv", {"k": [5]}))
    target = meta_flops(lambda: net(40, 3))
    gaps = {
        c: abs(meta_flops(lambda c=c: net(c, 5), PROBE_SIZE) - target) for c in (w - 1, w, w + 1)
    }
    assert gaps[w] == min(gaps.values()) and w < 40, gaps  # 5x5 costs more: narrower
    n = len(builds)
    assert matched_width(build, lambda: net(40, 3), 40, key=("two-conv", {"k": [5]})) == w
    assert len(builds) == n  # memoised: no search the second time


def test_complexity_package_does_not_import_the_models():
    """Layering: models import the complexity package (RandWire's width matcher), never the
    reverse, so there is no import circle."""
    code = (
        "import sys, rwdet.complexity, rwdet.complexity.width; "
        "print(sorted(m for m in sys.modules if m.startswith('rwdet.models')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


# ------------------------------------------------- analytic count vs fvcore's traced count
def _family(name):
    """One small model of each family (built with torch seed 0), and its input size."""
    small_rw = {"channels": 16, "nodes": 8, "num_classes": 10}
    return {
        "randwire_small": lambda: (build_model("randwire_small", **small_rw), 64),
        "randwire_regular": lambda: (
            build_model("randwire_c109", head_channels=64, **{**small_rw, "nodes": 10}),
            64,
        ),
        "randwire_popup": lambda: (build_model("randwire_small", wiring="popup", **small_rw), 64),
        "mobilenetv1_dnw": lambda: (
            build_model("mobilenetv1_dnw_small_x0225", node_multiplier=0.125, num_classes=10),
            64,
        ),
        "resnet50_popup": lambda: (build_model("resnet50_popup", num_classes=10), 32),
        "conv4": lambda: (build_model("conv4"), 32),
        "neuralgraph_static": lambda: (build_model("neuralgraph_static"), 32),
    }[name]()


@pytest.mark.parametrize(
    "family",
    [
        "randwire_small",
        "randwire_regular",
        "randwire_popup",
        "mobilenetv1_dnw",
        "resnet50_popup",
        "conv4",
        "neuralgraph_static",
    ],
)
def test_analytic_count_equals_fvcores_traced_count(family):
    """The analytic count (op shapes, what the tools report) is fvcore's, FLOPs and activations
    alike, for a model of each family; and built on the meta device it counts the same."""
    torch.manual_seed(0)
    model, size = _family(family)
    analytic = complexity(model, input_size=size)
    traced = complexity(model, input_size=size, method="traced")
    assert analytic == traced
    assert analytic["flops"] > 0 and analytic["activations"] > 0
    if family.startswith("randwire"):
        from rwdet.complexity.meta import meta_build

        with meta_build():
            torch.manual_seed(0)
            meta_model, _ = _family(family)
        assert next(meta_model.parameters()).is_meta
        assert complexity(meta_model, input_size=size) == analytic


def test_analytic_rules_match_fvcore_for_functional_ops():
    """Ops called outside any layer class (graphs' F.conv2d on weight slices, matmul, einsum,
    transposed and grouped convs, bias-free F.linear) are counted by fvcore's rules."""
    from torch import nn
    from torch.nn import functional as F

    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4, 3, 3))
            self.t = nn.Parameter(torch.randn(6, 2, 2, 2))
            self.fc = nn.Parameter(torch.randn(5, 6))

        def forward(self, x):
            y = F.conv2d(x, self.w, padding=1)  # 4 -> 6 channels
            y = F.conv2d(y, self.w[:, :2].reshape(12, 1, 3, 3)[:6], groups=6)
            y = F.conv_transpose2d(y, self.t, stride=2)  # 6 -> 2 channels, 2x the size
            z = F.adaptive_avg_pool2d(y, 3).flatten(1)  # (1, 18)
            z = z @ torch.ones(18, 6)
            z = torch.einsum("bi,oi->bo", z, self.fc) + torch.mm(z, self.fc.t())
            return F.linear(z, self.fc.t()) + torch.bmm(z[None], self.fc[None])[0]

    model, x = Ops(), torch.zeros(1, 4, 6, 6)
    from rwdet.complexity import count_ops
    from rwdet.complexity.traced import count_activations, count_flops

    counts = count_ops(model, x)
    assert counts.flops == count_flops(model, x) and counts.flops > 0
    assert counts.activations == count_activations(model, x) and counts.activations > 0


def test_a_forward_that_reads_values_is_counted_once_for_real():
    """The analytic count runs on meta copies of the tensors; a forward that needs a value
    (here a data-dependent branch, in rwdet the ODE solver's step size) cannot, and is then
    counted with one real forward, without what the aborted meta run had counted."""
    from torch import nn

    class ReadsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) if float(y.sum()) == float(y.sum()) else y

    model = ReadsValues()
    analytic = complexity(model, input_size=8)
    assert analytic == complexity(model, input_size=8, method="traced")
    assert analytic["flops"] == 6 * 6 * 4 * (27 + 4)


def test_complexity_rejects_an_unknown_method_and_traced_on_meta():
    from torch import nn

    with pytest.raises(ValueError, match="method='fvcore' is not known"):
        complexity(nn.Linear(2, 2), 8, method="fvcore")
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="real forward"):
        complexity(model, 8, method="traced")


# ------------------------------------------------- sparse counts: the layers' own protocol
def test_sparse_complexity_asks_each_layer_what_it_keeps():
    """A layer type reports itself through ``kept_counts`` (and the counter does not look
    inside it) or through ``kept_mask``; nothing in the counter names layer types."""
    from torch import nn

    from rwdet.complexity import KeptContext, sparse_complexity

    class HalfConv(nn.Conv2d):  # keeps the first half of its output channels' weights
        def kept_mask(self):
            mask = torch.zeros_like(self.weight, dtype=torch.bool)
            mask[: self.out_channels // 2] = True
            return mask

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Conv2d(4, 4, 1)  # counted by its owner, not by the default
            self.seen: list[KeptContext] = []

        def forward(self, x):
            return self.inner(x)

        def kept_counts(self, cx):
            self.seen.append(cx)
            return dict(params_dense=100, params_kept=7, flops_dense=1000, flops=70, nodes=3)

    counted = Counted()
    model = nn.Sequential(HalfConv(3, 4, 3, padding=1, bias=False), counted)
    c = sparse_complexity(model, input_size=5)
    dense_conv, kept_conv = 4 * 3 * 9, 2 * 3 * 9
    assert c["params_dense"] == dense_conv + 100 and c["params_kept"] == kept_conv + 7
    assert c["flops_dense"] == dense_conv * 25 + 1000 and c["flops"] == kept_conv * 25 + 70
    assert c["nodes"] == 3
    (cx,) = counted.seen
    assert tuple(cx.out_shape) == (1, 4, 5, 5) and cx.used is None and cx.live_nodes is None
