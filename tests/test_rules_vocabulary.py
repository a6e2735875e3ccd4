"""One vocabulary (#15 item 5): the fraction of weights kept is ``keep`` everywhere, ``k`` only
WS's neighbour count; old files that recorded ``k`` still load; and one wiring registry
(``rwdet.nn.wiring``) is the single source of every model's layer types."""

import pickle

import pytest
import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.models import build_model, get_graphs, load_model, save_model
from rwdet.models.artifact import upgrade_kwargs, upgrade_spec
from rwdet.nn import wiring as wiring_lib
from rwdet.nn.gates import StaticGates
from rwdet.nn.learned_gates import PopupGates
from rwdet.nn.sparse_layers import (
    DNWConv2d,
    DNWLinear,
    PopupConv2d,
    PopupLinear,
    SupermaskConv2d,
    SupermaskLinear,
)
from rwdet.run.errors import UserError

TINY_RW = {"channels": 8, "nodes": 6, "seed": 2, "num_classes": 10, "stem": "small"}
TINY_RESNET = {"layers": [1, 1, 1, 1], "width_per_group": 8, "num_classes": 10, "stem": "small"}
TINY_NG = {"dim": 24, "downsample_dim": 4, "feature_dim": 4}
POINTER = r"k=0\.3 is no longer the fraction kept; pass keep=0\.3"


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_model("conv4", wiring="popup", width=0.125, k=0.3),
        lambda: build_model("conv2", wiring="supermask", width=0.125, k=0.3),
        lambda: build_model("resnet50_popup", **TINY_RESNET, k=0.3),
        lambda: build_model("resnet50_dnw", **TINY_RESNET, k=0.3),
        lambda: build_model("neuralgraph_static", **TINY_NG, k=0.3),
        lambda: build_model("randwire_small", **TINY_RW, wiring="popup", wiring_options={"k": 0.3}),
        lambda: PopupConv2d(2, 3, 3, k=0.3),
        lambda: PopupLinear(4, 3, k=0.3),
        lambda: SupermaskConv2d(2, 3, 3, k=0.3),
        lambda: SupermaskLinear(4, 3, k=0.3),
        lambda: DNWConv2d(2, 3, 3, k=0.3),
        lambda: DNWLinear(4, 3, k=0.3),
        lambda: PopupGates(GraphSpec(3, [(0, 1), (1, 2)]), k=0.3),
    ],
    ids=["conv4", "conv2-supermask", "resnet-popup", "resnet-dnw", "neuralgraph", "randwire",
         "PopupConv2d", "PopupLinear", "SupermaskConv2d", "SupermaskLinear", "DNWConv2d",
         "DNWLinear", "PopupGates"],
)  # fmt: skip
def test_old_keyword_k_is_refused_with_a_pointer_to_keep(build):
    with pytest.raises(UserError, match=POINTER) as e:
        build()
    assert "\n" not in str(e.value)


def test_keep_is_the_fraction_kept_and_ws_k_is_untouched():
    """``keep`` sets the count; WS's ``gen_params.k`` still sets the neighbours (N*k/2 edges)."""
    assert PopupLinear(10, 10, keep=0.3).count == 30
    assert DNWConv2d(1, 1, (1, 10), keep=0.7).count == 7
    model = build_model(
        "randwire_small", **{**TINY_RW, "nodes": 8}, gen="ws", gen_params={"k": 4, "p": 0.0}
    )
    assert {len(g.edges) for g in get_graphs(model).values()} == {8 * 4 // 2}
    assert model.rwdet_spec["kwargs"]["gen_params"] == {"k": 4, "p": 0.0}
    ws = {"gen_params": {"k": 4, "p": 0.75}, "wiring_options": {"init": "uniform"}}
    assert upgrade_kwargs(ws) == ws  # WS's k is never translated
    assert upgrade_kwargs({"k": 0.3, "init": "x"}) == {"keep": 0.3, "init": "x"}
    assert upgrade_kwargs({"wiring_options": {"k": 0.5}}) == {"wiring_options": {"keep": 0.5}}
    assert upgrade_spec("not a spec") == "not a spec"


def _write_old(path, model) -> None:
    """``save_model``'s file as it was written before the rename: the fraction kept as ``k``."""
    save_model(model, path)
    data = torch.load(path, weights_only=True)
    kwargs = dict(data["model_spec"]["kwargs"])
    if "keep" in kwargs:
        kwargs = {("k" if key == "keep" else key): v for key, v in kwargs.items()}
    if "wiring_options" in kwargs:
        kwargs["wiring_options"] = {"k": kwargs["wiring_options"]["keep"]}
    data["model_spec"]["kwargs"] = kwargs
    torch.save(data, path)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("conv2", {"wiring": "popup", "width": 0.125, "keep": 0.5}),
        ("resnet50_dnw", {**TINY_RESNET, "keep": 0.2}),
        ("neuralgraph_static", {**TINY_NG, "keep": 0.1}),
        ("randwire_small", {**TINY_RW, "wiring": "popup", "wiring_options": {"keep": 0.5}}),
    ],
)
def test_files_written_with_k_still_load_and_equal_the_model(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    _write_old(tmp_path / "old.pth", model)
    stored = torch.load(tmp_path / "old.pth", weights_only=True)["model_spec"]["kwargs"]
    assert "keep" not in stored and "keep" not in stored.get("wiring_options", {})
    loaded = load_model(tmp_path / "old.pth").eval()
    assert loaded.rwdet_spec == model.rwdet_spec  # recorded again in today's vocabulary
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_old_training_checkpoint_resumes_and_old_detection_weights_resolve(tmp_path):
    """The trainer's resume check and detection's MODEL.WEIGHTS read old specs translated."""
    from test_d2_convert import det_cfg

    from classification.checkpoint import check_model_spec
    from rwdet.d2.convert import convert_rwdet_checkpoint
    from rwdet.d2.spec import resolve_backbone_spec
    from rwdet.d2.weights import save_d2_weights

    model = build_model("randwire_small", **TINY_RW, wiring="popup", wiring_options={"keep": 0.5})
    _write_old(tmp_path / "old.pth", model)
    ckpt = torch.load(tmp_path / "old.pth", weights_only=True)
    check_model_spec(ckpt, model.rwdet_spec, "old.pth")  # no mismatch: k is read as keep
    det = convert_rwdet_checkpoint(ckpt, where="old.pth")
    assert det["rwdet"]["model_spec"]["kwargs"]["wiring_options"] == {"keep": 0.5}
    det["rwdet"]["model_spec"]["kwargs"]["wiring_options"] = {"k": 0.5}  # an old .pkl's record
    save_d2_weights(str(tmp_path / "old_det.pkl"), det)
    spec = resolve_backbone_spec(det_cfg(str(tmp_path / "old_det.pkl")))
    assert spec.kwargs["wiring_options"] == {"keep": 0.5}


# ---------------------------------------------------------------- one wiring -> layer factory


class ToyConv(nn.Conv2d):
    pass


class ToyLinear(nn.Linear):
    pass


class ToyNorm(nn.BatchNorm2d):
    pass


@pytest.fixture
def toy_wiring(monkeypatch):
    """A wiring registered once, at both levels, with its own layer types."""

    def toy(keep: float = 0.5) -> wiring_lib.Wiring:
        return wiring_lib.Wiring(
            "toy",
            lambda spec, edge_drop: StaticGates(spec.edges, edge_drop),
            conv_layer=ToyConv,
            norm_layer=ToyNorm,
            linear_layer=ToyLinear,
        )

    for level in wiring_lib.LEVELS:
        monkeypatch.setitem(wiring_lib.WIRINGS[level], "toy", toy)
    return toy


def test_one_registration_reaches_conv_resnet_and_randwire(toy_wiring):
    models = {
        "conv4": build_model("conv4", wiring="toy", width=0.125),
        "resnet": build_model("resnet50_popup", **TINY_RESNET, wiring="toy"),
        "randwire": build_model("randwire_small", **TINY_RW, wiring="toy"),
    }
    for where, model in models.items():
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is ToyConv for m in convs), where
        assert type(model.fc) is ToyLinear, where
        model.reset_classifier(3)
        assert type(model.get_classifier()) is ToyLinear, where
    for where in ("resnet", "randwire"):
        norms = [m for m in models[where].modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(type(m) is ToyNorm for m in norms), where


def test_registry_layer_types_are_what_each_model_builds():
    """The registry's layer types (not a per-model table) decide every model's layers."""
    for wiring, conv, linear in (
        ("popup", PopupConv2d, PopupLinear),
        ("supermask", SupermaskConv2d, SupermaskLinear),
        ("dnw", DNWConv2d, DNWLinear),
        ("dense", nn.Conv2d, nn.Linear),
    ):
        w = wiring_lib.layer_wiring(wiring, keep=0.3)
        assert w.conv_layer(2, 3, 3, bias=False).__class__ is conv
        resnet = build_model("resnet50_popup", **TINY_RESNET, wiring=wiring, keep=0.3)
        convnet = build_model("conv2", wiring=wiring, width=0.125, keep=0.3)
        for model in (resnet, convnet):
            assert type(model.layer1[0].conv1 if model is resnet else model.block1[0]) is conv
            assert type(model.fc) is linear
            assert getattr(model.fc, "keep", 0.3) == 0.3
            pickle.loads(pickle.dumps(model))  # a model keeping its wiring still pickles
    with pytest.raises(ValueError, match="wiring='static' is not known for models without node"):
        build_model("conv2", wiring="static")
    with pytest.raises(ValueError, match="wiring='supermask' is not known for node-level"):
        build_model("randwire_small", **TINY_RW, wiring="supermask")
    with pytest.raises(ValueError, match="wiring='popup' takes no option 'keeep'"):
        build_model("randwire_small", **TINY_RW, wiring="popup", wiring_options={"keeep": 0.5})
    with pytest.raises(ValueError, match="registered twice"):
        wiring_lib.register_wiring("popup", levels=("weight",))(lambda: None)


def test_default_run_folders_keep_their_names_from_before_the_rename():
    """train_cls's default folder names ``keep`` as ``k``, as runs started before #15 are
    named, so such a run is found again and resumed (its checkpoint's ``k`` reads as keep)."""
    from test_cls_config import cli

    name = cli("--model", "conv4", "--wiring", "popup", "model.kwargs.keep", "0.3")["name"]
    assert "_k-0.3" in name and "keep" not in name
