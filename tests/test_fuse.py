"""``rwdet.nn.fuse_for_inference``: eager eval's outputs, with nothing of training left."""

import pytest
import torch
from torch import nn

from rwdet.models import build_model
from rwdet.nn import fuse_for_inference
from rwdet.nn.gates import StaticGates
from rwdet.nn.learned_gates import LEARNED_GATES, FixedGates
from rwdet.nn.sparse_layers import SPARSE_LAYERS
from rwdet.run.errors import UserError

TINY = {"channels": 8, "nodes": 8, "stem": "small", "num_classes": 10, "head_channels": 16}


def _norms(model):
    from detectron2.layers import FrozenBatchNorm2d

    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


@torch.no_grad()
def _trained_looking(model):
    """BN statistics and affine away from their init, so a wrong fold shows in the outputs."""
    torch.manual_seed(1)
    for m in _norms(model):
        m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2.0)
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.5)
    for m in model.modules():
        if isinstance(m, StaticGates):
            m.weight.normal_()
    return model.eval()


def _assert_same(model, fused, x):
    with torch.no_grad():
        a, b = model(x), fused(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize(
    "name,kw",
    [
        ("randwire_small", {}),
        ("randwire_c109", {"nodes": 10}),
        ("randwire_small", {"wiring": "dnw"}),
        ("randwire_small", {"wiring": "popup"}),
    ],
    ids=["small", "regular", "dnw", "popup"],
)
def test_randwire_fused_matches_eager_with_nothing_of_training_left(name, kw):
    torch.manual_seed(0)
    model = _trained_looking(build_model(name, **{**TINY, **kw}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    _assert_same(model, fused, torch.randn(2, 3, 32, 32))
    assert not _norms(fused), "every BN follows a conv in RandWire and folds"
    assert not any(isinstance(m, (StaticGates, *LEARNED_GATES, *SPARSE_LAYERS))
                   for m in fused.modules())  # fmt: skip
    gates = [m for m in fused.modules() if isinstance(m, FixedGates)]
    assert gates and all(g.unit_edges or kw.get("wiring") for g in gates)
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    # the argument is left as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.conv3.gates.__class__ is not FixedGates


def test_fused_stage_keeps_sigmoid_gates_and_unit_edges():
    torch.manual_seed(0)
    model = _trained_looking(build_model("randwire_small", **TINY))
    stage, fused = model.conv3, fuse_for_inference(model).conv3
    with torch.no_grad():
        torch.testing.assert_close(fused.gates(), stage.gates(), rtol=0, atol=0)
    assert fused.gates.unit_edges == stage.gates.unit_edges


def test_mobilenet_dnw_fused_matches_eager():
    """Pre-activation BN (BN -> ReLU -> conv) is not folded; the DNW graphs are frozen."""
    torch.manual_seed(0)
    model = _trained_looking(
        build_model("mobilenetv1_dnw_x0225", node_multiplier=0.1, stem="small", num_classes=10)
    )
    fused = fuse_for_inference(model)
    _assert_same(model, fused, torch.randn(2, 3, 32, 32))
    assert all(g.wiring == "fixed" for g in fused.modules() if hasattr(g, "budget"))


@pytest.mark.slow
@pytest.mark.parametrize("wiring", ["resnet50", "resnet50_popup"])
def test_resnet_fused_matches_eager(wiring):
    torch.manual_seed(0)
    model = _trained_looking(build_model(wiring, layers=[1, 1, 1, 1], stem="small", num_classes=10))
    fused = fuse_for_inference(model)
    _assert_same(model, fused, torch.randn(2, 3, 32, 32))
    assert not _norms(fused)


def test_frozen_bn_and_detectron2_conv_norm_fold():
    """The detection backbone's FrozenBN, and detectron2 ``Conv2d(norm=...)`` (its ResNets,
    FPN with norm) fold like BN."""
    from detectron2.layers import Conv2d, get_norm

    torch.manual_seed(0)
    model = build_model("randwire_small", **TINY, norm_layer=lambda c: get_norm("FrozenBN", c))
    model = nn.Sequential(Conv2d(3, 3, 3, padding=1, norm=get_norm("FrozenBN", 3)), model)
    model = _trained_looking(model)
    fused = fuse_for_inference(model)
    _assert_same(model, fused, torch.randn(2, 3, 32, 32))
    assert not _norms(fused) and fused[0].norm is None and fused[0].bias is not None


def test_training_mode_is_refused():
    model = build_model("randwire_small", **TINY)
    with pytest.raises(UserError, match=r"eval mode.*model\.eval\(\)"):
        fuse_for_inference(model)
    model.eval()
    model.conv4.nodes[2][3].train()  # one BN left in training mode is refused too
    with pytest.raises(UserError, match="conv4.nodes.2.3 is in training mode"):
        fuse_for_inference(model)


def test_traced_fused_model_has_no_batch_norm_and_matches():
    torch.manual_seed(0)
    model = _trained_looking(build_model("randwire_small", **TINY))
    x = torch.randn(1, 3, 32, 32)
    fused = fuse_for_inference(model)
    traced = torch.jit.trace(fused, (x,), check_trace=False)
    assert "batch_norm" not in str(traced.inlined_graph)
    assert "sigmoid" not in str(traced.inlined_graph)
    _assert_same(model, traced, x)


@pytest.mark.slow
def test_exporter_folds_unless_no_fuse(tmp_path, monkeypatch, capsys):
    """tools/export.py traces the folded model by default and checks it against the unfused
    eager model; ``--no-fuse`` exports the graph with its BatchNorms."""
    import runpy
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "export.py"
    kwargs = '{"channels": 8, "nodes": 8, "stem": "small", "num_classes": 10}'
    graphs = {}
    for flag in ([], ["--no-fuse"]):
        out = tmp_path / f"m{len(flag)}.pt"
        argv = ["randwire_small", "--model-kwargs", kwargs, "--format", "torchscript"]
        monkeypatch.setattr(
            sys, "argv", [str(tool), *argv, "--out", str(out), "--input-size", "32", *flag]
        )
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(tool), run_name="__main__")
        assert e.value.code == 0, capsys.readouterr().err
        graphs[bool(flag)] = str(torch.jit.load(str(out)).inlined_graph)
    assert "batch_norm" not in graphs[False] and "sigmoid" not in graphs[False]
    assert "batch_norm" in graphs[True] and "sigmoid" in graphs[True]
