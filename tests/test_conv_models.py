"""Conv2/4/6/8 of edge-popup Table 1 and the one ``wiring`` keyword (rwdet.models.conv)."""

import json
import math

import pytest
import torch
from test_cls_config import load_tool
from test_cls_data import make_fashion_mnist
from torch import nn

from rwdet.complexity import sparse_complexity
from rwdet.models import build_model, conv, load_model
from rwdet.models.sparse_resnet import SparseResNet
from rwdet.nn.sparse_layers import PopupConv2d, PopupLinear, SupermaskConv2d, SupermaskLinear

# Table 1, written out as its layers: 3x3 convs (no bias), pairs per stage, a 2x2 max-pool
# after each pair, then FC 256-256-10 reading the flattened last map of a 32x32x3 image.
TABLE1_LAYERS = {
    "conv2": [64, 64],
    "conv4": [64, 64, 128, 128],
    "conv6": [64, 64, 128, 128, 256, 256],
    "conv8": [64, 64, 128, 128, 256, 256, 512, 512],
}


def table1_count(name: str, side: int = 32, cin: int = 3, classes: int = 10) -> int:
    total = 0
    for i, c in enumerate(TABLE1_LAYERS[name]):
        total += cin * c * 9
        cin = c
        if i % 2:
            side //= 2
    return total + cin * side * side * 256 + 256 * 256 + 256 * classes


@pytest.mark.parametrize("name", list(TABLE1_LAYERS))
@pytest.mark.parametrize("wiring", ["dense", "popup", "supermask"])
def test_parameter_count_is_table1s(name, wiring):
    with torch.device("meta"):
        model = build_model(name, wiring=wiring)
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))
    expected = table1_count(name)
    assert weights == expected
    assert f"{expected:,}" in conv.__doc__  # the count the docstring states is the code's
    assert not any(getattr(m, "bias", None) is not None for m in model.modules())
    if wiring != "dense":  # fixed weights, one score each, nothing else learned
        assert all(not p.requires_grad for n, p in model.named_parameters() if "scores" not in n)
        scores = sum(p.numel() for n, p in model.named_parameters() if n.endswith("scores"))
        assert scores == expected


def test_frankle_carbin_counts_round_to_their_figure():
    # Frankle & Carbin (Fig. 2) give Conv-2 4.3M and Conv-4 2.4M for the same layers.
    assert round(table1_count("conv2") / 1e6, 1) == 4.3
    assert round(table1_count("conv4") / 1e6, 1) == 2.4


@pytest.mark.parametrize("name", list(TABLE1_LAYERS))
@pytest.mark.parametrize("wiring", ["dense", "popup", "supermask"])
def test_forward_at_fashion_mnist_and_cifar_sizes(name, wiring):
    for cin, size in ((1, 28), (3, 32)):
        model = build_model(name, wiring=wiring, width=0.125, in_channels=cin, input_size=size)
        out = model(torch.randn(2, cin, size, size))
        assert out.shape == (2, 10)
        assert model.feature_info.reduction() == [2, 4, 8, 16][: len(TABLE1_LAYERS[name]) // 2]
    # Conv8 at 28 px: 28 -> 14 -> 7 -> 3 -> 1, so its first FC reads 512 values.
    if name == "conv8":
        m = build_model(name, in_channels=1, input_size=28)
        assert m.head[1].in_features == 512


def test_wrong_input_size_names_the_keyword():
    model = build_model("conv4", width=0.125)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(1, 3, 28, 28))


def test_width_scales_every_conv_and_hidden_fc():
    model = build_model("conv4", width=2)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [128, 128, 256, 256]
    assert model.num_features == 512 and model.head[1].out_features == 512
    assert model.fc.in_features == 512 and model.fc.out_features == 10


def test_layer_kinds_follow_wiring_and_the_classifier_can_be_reset():
    model = build_model("conv2", wiring="popup", keep=0.3, width=0.125, init="kaiming_normal")
    assert all(isinstance(m, PopupConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(model.fc, PopupLinear) and model.fc.keep == 0.3
    model.reset_classifier(5)
    assert isinstance(model.fc, PopupLinear) and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    sm = build_model("conv2", wiring="supermask", width=0.125, num_classes=0)
    assert isinstance(sm.head[1], SupermaskLinear) and isinstance(sm.block1[0], SupermaskConv2d)
    with pytest.raises(ValueError, match="wiring='sparse' is not known"):
        build_model("conv2", wiring="sparse")
    with pytest.raises(ValueError, match="scale=True"):
        build_model("conv2", wiring="dense", scale=True)


def _sgd_steps(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("wiring", ["popup", "supermask"])
def test_fixed_weights_are_bit_identical_after_sgd_with_decay_and_momentum(wiring):
    torch.manual_seed(0)
    model = build_model("conv4", wiring=wiring, width=0.125)
    before = {n: p.clone() for n, p in model.named_parameters()}
    _sgd_steps(model)
    for n, p in model.named_parameters():
        if n.endswith("scores"):
            assert not torch.equal(p, before[n]), n  # the search did run
        else:
            assert torch.equal(p, before[n]), n


def test_dense_wiring_learns_its_weights():
    torch.manual_seed(0)
    model = build_model("conv2", width=0.125)
    before = model.block1[0].weight.clone()
    _sgd_steps(model, steps=1)
    assert not torch.equal(model.block1[0].weight, before)


def test_sparse_complexity_counts_popup_and_supermask_kept_weights():
    torch.manual_seed(0)
    popup = build_model("conv2", wiring="popup", keep=0.3, width=0.25)
    c = sparse_complexity(popup, input_size=32)
    dense = table1_count_width(0.25)
    assert c["params_dense"] == dense and abs(c["params_kept"] / dense - 0.3) < 1e-3
    sm = build_model("conv2", wiring="supermask", width=0.25)
    c = sparse_complexity(sm, input_size=32)
    layers = [m for m in sm.modules() if isinstance(m, (SupermaskConv2d, SupermaskLinear))]
    assert c["params_kept"] == sum(int((m.scores > 0).sum()) for m in layers)
    assert c["score_params"] == c["params_dense"] == dense


def table1_count_width(width):
    c, h = round(64 * width), round(256 * width)
    return 3 * c * 9 + c * c * 9 + c * 16 * 16 * h + h * h + h * 10


def test_mode_keyword_is_refused_naming_wiring():
    tiny = {"layers": [1, 1, 1, 1], "width_per_group": 8}
    with pytest.raises(TypeError, match="wiring="):
        SparseResNet(**tiny, mode="popup")
    with pytest.raises(TypeError, match="wiring='dense'"):
        build_model("resnet50_popup", **tiny, mode="dense")
    assert build_model("resnet50_dnw", **tiny).wiring == "dnw"


def test_resnet_takes_supermask_wiring():
    model = build_model(
        "resnet50_popup", layers=[1, 1, 1, 1], width_per_group=8, wiring="supermask"
    )
    masked = [m for m in model.modules() if isinstance(m, (SupermaskConv2d, SupermaskLinear))]
    assert len(masked) == sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)) + 1
    assert all(n.endswith("scores") for n, p in model.named_parameters() if p.requires_grad)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.slow
def test_conv4_popup_trains_with_the_cls_tool(tmp_path):
    make_fashion_mnist(str(tmp_path / "fm"), n_train=32, n_val=10)
    out = str(tmp_path / "out")
    argv = [
        "--model", "conv4", "--wiring", "popup", "--epochs", "1", "--batch-size", "8",
        "--output-dir", out, "data.fashion_mnist_dir", f"{tmp_path}/fm",
        "model.gen", "null", "model.seed", "null", "model.channels", "null", "model.nodes", "null",
        "model.kwargs", "{keep: 0.5, input_size: 28, width: 0.25}", "train.precise_bn", "0",
        "train.complexity", "false", "train.channels_last", "false",
    ]  # fmt: skip
    assert load_tool().main(argv) == 0
    with open(f"{out}/metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert train and train[-1]["iteration"] == 4 and math.isfinite(train[-1]["loss"])
    spec = load_model(f"{out}/last.pth")
    assert spec.rwdet_spec["name"] == "conv4" and spec.rwdet_spec["kwargs"]["wiring"] == "popup"
