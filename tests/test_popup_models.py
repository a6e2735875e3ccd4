"""edge-popup models (ResNets, RandWire with wiring="popup"): structure, counts, export."""

import math

import pytest
import torch
from torch import nn

from rwdet.complexity import sparse_complexity
from rwdet.complexity.traced import count_flops
from rwdet.models import build_model, stage_outputs
from rwdet.nn.export import export_subnetwork
from rwdet.nn.sparse_layers import SPARSE_LAYERS, PopupConv2d, PopupLinear


def tiny_randwire(wiring, **kw):
    return build_model(
        "randwire_small", channels=8, nodes=8, wiring=wiring, num_classes=10, stem="small", **kw
    )


def test_resnet_popup_structure():
    model = build_model("resnet50_popup", layers=[1, 1, 1, 1], num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, PopupConv2d) for m in convs)
    assert isinstance(model.fc, PopupLinear) and model.keep == 0.3
    assert all(not m.affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(n.endswith("scores") for n, p in model.named_parameters() if p.requires_grad)
    feats = stage_outputs(model, torch.randn(1, 3, 64, 64))
    assert list(feats) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert [64 // f.shape[-1] for f in feats.values()] == list(model.stage_strides.values())
    assert [f.shape[1] for f in feats.values()] == list(model.stage_channels.values())
    small = build_model(
        "resnet50_popup", layers=[1, 1, 1, 1], stem="small", in_channels=1, first_layer_dense=True
    )
    assert type(small.conv1) is nn.Conv2d and small.conv1.weight.requires_grad
    assert small.forward_features(torch.randn(1, 1, 32, 32)).shape[-1] == 4


def test_counts_agree_with_fvcore_for_dense_models_and_popup_dense_counts():
    static = tiny_randwire("static")
    c = sparse_complexity(static, 32)
    assert c["flops"] == c["flops_dense"] == count_flops(static, torch.zeros(1, 3, 32, 32))
    assert c["params_kept"] == c["params_dense"] == sum(p.numel() for p in static.parameters())
    popup = tiny_randwire("popup")
    c = sparse_complexity(popup, 32)
    # fvcore sees the masked weights as dense convolutions: our dense count must agree with it.
    assert c["flops_dense"] == count_flops(popup, torch.zeros(1, 3, 32, 32))
    assert 0.2 * c["flops_dense"] < c["flops"] < 0.4 * c["flops_dense"]
    assert c["score_params"] == sum(p.numel() for p in popup.parameters() if p.requires_grad)


def test_randwire_popup_export_same_outputs():
    torch.manual_seed(0)
    model = tiny_randwire("popup", wiring_options={"keep": 0.5})
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
    model.eval()
    exported = export_subnetwork(model)
    with torch.no_grad():
        assert torch.equal(model(x), exported(x))
    assert not any(isinstance(m, SPARSE_LAYERS) for m in exported.modules())
    assert not any(hasattr(m, "scores") for m in exported.modules())
    a, b = sparse_complexity(model, 32), sparse_complexity(exported, 32)
    assert (a["flops"], a["params_kept"]) == (b["flops"], b["params_kept"])


def test_resnet_popup_export_same_outputs():
    torch.manual_seed(0)
    model = build_model("resnet50_popup", layers=[1, 1, 1, 1], num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x)  # BN running statistics move off their initial values
    model.eval()
    exported = export_subnetwork(model)
    with torch.no_grad():
        assert torch.equal(model(x), exported(x))
    conv = exported.layer2[0].conv2
    source = model.layer2[0].conv2
    assert (
        int((conv.weight != 0).sum())
        == source.count
        == math.floor(0.3 * source.weight.numel() + 0.5)
    )


@pytest.mark.parametrize(
    "name,torchvision_name",
    [("resnet101_popup", "resnet101"), ("wide_resnet50_popup", "wide_resnet50_2")],
)
def test_popup_resnets_are_torchvisions_keeping_30_percent(name, torchvision_name):
    """Built for real (on the meta device: shapes and counts, no memory): the fixed weights are
    torchvision's architecture less BN affine and the FC bias, and k = 30% in every layer."""
    import torchvision

    with torch.device("meta"):
        model = build_model(name)
        reference = getattr(torchvision.models, torchvision_name)()
    bn = sum(
        p.numel()
        for m in reference.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    )
    total = sum(p.numel() for p in reference.parameters())
    fixed = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert fixed == total - bn - 1000
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    assert all(m.count == math.floor(0.3 * m.weight.numel() + 0.5) for m in layers)


@pytest.mark.slow
def test_full_size_resnet50_popup_is_torchvisions_resnet50_keeping_30_percent():
    model = build_model("resnet50_popup")
    fixed = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # torchvision's 25.557M minus what edge-popup drops: BN affine (53,120) and the FC bias.
    assert fixed == 25_557_032 - 53_120 - 1000
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    kept = sum(m.count for m in layers) / sum(m.weight.numel() for m in layers)
    assert abs(kept - 0.3) < 1e-4
