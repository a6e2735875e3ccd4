"""The timm-style model interface: build_model keywords, features_only, heads, pretrained."""

import pytest
import torch
from torch import nn

from rwdet.checkpoint_io import model_record
from rwdet.models import (
    FeatureListModel,
    build_model,
    get_graphs,
    list_models,
    model_capabilities,
    stage_outputs,
)
from rwdet.run.errors import UserError

TINY_RW = {"channels": 8, "nodes": 6, "gen": "er", "gen_params": {"p": 0.5}, "head_channels": 16}
TINY = {
    "randwire_small": TINY_RW,
    "randwire_c109": TINY_RW,
    "randwire_c154": TINY_RW,
    "mobilenetv1": {"node_multiplier": 0.0625},
    "resnet": {"layers": [1, 1, 1, 1], "width_per_group": 8},
    "wide_resnet": {"layers": [1, 1, 1, 1], "width_per_group": 8},
    "neuralgraph": {"dim": 24, "downsample_dim": 4, "feature_dim": 4, "keep": 0.1},
    "conv": {"width": 0.125, "input_size": 64},  # the head is sized for X's 64 px
}
# One small model of each family (and each RandWire wiring) for the checks that run forward.
FAMILIES = [
    ("randwire_small", TINY_RW),
    ("randwire_c109", TINY_RW),
    ("randwire_small", {**TINY_RW, "wiring": "dnw"}),
    ("randwire_small", {**TINY_RW, "wiring": "popup"}),
    ("mobilenetv1_dnw_x0225", TINY["mobilenetv1"]),
    ("mobilenetv1_rg_x0225", TINY["mobilenetv1"]),
    ("mobilenetv1_dnw_small_x0225", TINY["mobilenetv1"]),
    ("resnet50_popup", TINY["resnet"]),
    ("resnet50_dnw", TINY["resnet"]),
    ("resnet50", TINY["resnet"]),
]
X = torch.randn(2, 3, 64, 64)


def tiny(name: str) -> dict:
    return next(v for k, v in TINY.items() if name.startswith(k))


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_without_classifier(name):
    # Full size on the meta device (no memory, no init) where the model allows it.
    try:
        with torch.device("meta"):
            model = build_model(name, num_classes=0)
    except (RuntimeError, NotImplementedError):
        model = None  # MobileNet-DNW counts its allowed edges from tensor values
    if model is not None:
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    model = build_model(name, num_classes=0, **tiny(name)).eval()
    with torch.no_grad():
        out = model(X)
    assert out.shape == (2, model.num_features)
    assert model.rwdet_spec["kwargs"]["num_classes"] == 0


@pytest.mark.parametrize("name,kwargs", FAMILIES, ids=lambda v: str(v)[:30])
def test_features_only_maps_match_feature_info(name, kwargs):
    full = build_model(name, num_classes=5, **kwargs).eval()
    assert len(full.feature_info) == 5
    with torch.no_grad():
        final = full.forward_features(X)
        assert torch.is_tensor(final)  # the final map, not a dict
        assert final.shape[1] == full.feature_info.channels(-1)
        assert torch.allclose(full.forward_head(final), full(X))
        pooled = full.forward_head(final, pre_logits=True)
        assert pooled.shape == (2, full.num_features)
    feats = build_model(name, features_only=True, **kwargs).eval()
    assert isinstance(feats, FeatureListModel) and feats.out_indices == (0, 1, 2, 3, 4)
    with torch.no_grad():
        maps = feats(X)
    assert len(maps) == len(feats.feature_info) == 5
    for m, info in zip(maps, feats.feature_info):
        assert m.shape[1] == info["num_chs"]
        assert X.shape[-1] // m.shape[-1] == info["reduction"]
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert not any(
        k.split(".")[1] in ("head", "fc", "dropout", "avgpool") for k in feats.state_dict()
    )


def test_randwire_c109_four_maps_match_feature_info():
    model = build_model("randwire_c109", features_only=True, out_indices=(1, 2, 3, 4), **TINY_RW)
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, 64, 64))
    info = model.feature_info
    assert len(maps) == 4 and [d["module"] for d in info] == ["conv2", "conv3", "conv4", "conv5"]
    assert [m.shape[1] for m in maps] == info.channels() == [8, 16, 32, 64]
    assert [64 // m.shape[-1] for m in maps] == info.reduction() == [4, 8, 16, 32]
    assert info.channels(0) == 8 and info.module_name(-1) == "conv5"


def test_features_agree_with_stage_outputs_and_bad_indices_are_refused():
    torch.manual_seed(0)
    full = build_model("randwire_small", **TINY_RW).eval()
    feats = build_model("randwire_small", features_only=True, out_indices=(-1, 2), **TINY_RW)
    feats.model.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        want = stage_outputs(full, X, ["conv3", "conv5"])
        got = feats.eval()(X)
    assert feats.out_indices == (2, 4)  # stage order; negative indices count from the end
    assert torch.equal(got[0], want["conv3"]) and torch.equal(got[1], want["conv5"])
    for bad in [(5,), (1, 1), ()]:
        with pytest.raises(ValueError, match="out_indices"):
            build_model("randwire_small", features_only=True, out_indices=bad, **TINY_RW)
    with pytest.raises(ValueError, match="features_only"):
        build_model("randwire_small", out_indices=(1,), **TINY_RW)
    with pytest.raises(ValueError, match="not stages"):
        stage_outputs(full, X, ["res4"])


@pytest.mark.parametrize("name,kwargs", FAMILIES, ids=lambda v: str(v)[:30])
def test_reset_classifier_keeps_the_models_layer_kind(name, kwargs):
    model = build_model(name, num_classes=10, **kwargs)
    kind = type(model.get_classifier())
    model.reset_classifier(3)
    assert type(model.get_classifier()) is kind and model.num_classes == 3
    assert model.eval()(X).shape == (2, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(X).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_in_chans_and_drop_rate_are_aliases_of_the_models_keywords():
    for name, kwargs in FAMILIES[::3] + [FAMILIES[-1]]:
        model = build_model(name, in_chans=1, drop_rate=0.25, num_classes=4, **kwargs)
        assert model.rwdet_spec["kwargs"]["in_channels"] == 1
        assert model.rwdet_spec["kwargs"]["dropout"] == 0.25
        assert "in_chans" not in model.rwdet_spec["kwargs"]
        assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.25
        assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)
        assert model_capabilities(name).drop_rate == "dropout"
    assert isinstance(build_model("resnet50", **TINY["resnet"]).dropout, nn.Identity)
    with pytest.raises(ValueError, match="name the same setting"):
        build_model("randwire_small", in_chans=1, in_channels=3, **TINY_RW)
    with pytest.raises(ValueError, match=r"drop_rate\)=1.5"):
        build_model("resnet50", drop_rate=1.5, **TINY["resnet"])


def test_list_models_pattern():
    assert list_models("randwire_*") == ["randwire_c109", "randwire_c154", "randwire_small"]
    assert set(list_models("*popup*")) == {
        "resnet50_popup",
        "resnet101_popup",
        "wide_resnet50_popup",
    }
    assert list_models("nothing*") == []
    assert list_models() == sorted(list_models())
    assert model_capabilities("randwire_small").norm_layer
    assert not model_capabilities("resnet50_popup").norm_layer


def save_trained(path, name, kwargs):
    """A checkpoint in tools/train_cls.py's format, from a model after one SGD step."""
    torch.manual_seed(1)
    model = build_model(name, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(X).square().mean().backward()
    opt.step()
    torch.save(model_record(model), path)
    return model.eval()


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("randwire_small", {**TINY_RW, "gen": "ws", "gen_params": {"k": 2}, "seed": 7}),
        ("randwire_small", {**TINY_RW, "wiring": "popup"}),
        ("mobilenetv1_rg_x0225", TINY["mobilenetv1"]),
    ],
    ids=["randwire", "popup", "mobilenet"],
)
def test_pretrained_path_round_trip(tmp_path, name, kwargs):
    path = tmp_path / "best.pth"
    trained = save_trained(path, name, {**kwargs, "num_classes": 6})
    # The checkpoint's own keywords and graphs: nothing needs repeating.
    model = build_model(name, pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(model(X), trained(X))
    assert get_graphs(model).keys() == get_graphs(trained).keys()
    assert model.rwdet_spec == trained.rwdet_spec
    # Another class count: the body loads, the classifier is fresh.
    other = build_model(name, pretrained=path, num_classes=3).eval()
    assert other(X).shape == (2, 3)
    body = {k: v for k, v in trained.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in body.items())
    pooled = build_model(name, pretrained=path, num_classes=0).eval()
    with torch.no_grad():
        assert torch.equal(pooled(X), trained.forward_head(trained.forward_features(X), True))
    feats = build_model(name, pretrained=path, features_only=True, out_indices=(4,)).eval()
    with torch.no_grad():
        assert torch.equal(feats(X)[0], trained.forward_features(X))


def test_pretrained_errors(tmp_path):
    path = tmp_path / "best.pth"
    save_trained(path, "randwire_small", TINY_RW)
    with pytest.raises(UserError, match="no default weights.*pretrained='output/<run>/best.pth'"):
        build_model("randwire_small", pretrained=True)
    with pytest.raises(UserError, match="holds weights of 'randwire_small', not 'randwire_c109'"):
        build_model("randwire_c109", pretrained=path)
    with pytest.raises(UserError, match="graphs"):  # other generator settings than trained
        build_model("randwire_small", pretrained=path, seed=2)
    with pytest.raises(UserError, match="does not fit"):
        build_model("randwire_small", pretrained=path, in_chans=1)
    with pytest.raises(UserError, match="does not exist"):
        build_model("randwire_small", pretrained=tmp_path / "missing.pth")
    ckpt = torch.load(path, weights_only=True)
    stage = ckpt["graphs"]["graphs"]["conv3"]
    stage["edges"] = stage["edges"][:-1]
    torch.save(ckpt, tmp_path / "edited.pth")
    with pytest.raises(UserError, match="changed after it was written"):
        build_model("randwire_small", pretrained=tmp_path / "edited.pth")
    assert build_model("randwire_small", pretrained=False, **TINY_RW).num_classes == 1000
