"""Detectron2 backbones: FPN shapes and strides, no unused parameters, FREEZE_AT, norms, errors."""

import math
from pathlib import Path

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from torch import nn

import rwdet.d2  # noqa: F401  (registers the backbones)
from rwdet.d2 import add_rwdet_config

BASE = str(Path(__file__).resolve().parents[1] / "configs" / "Base-RandWire-FPN.yaml")
TINY = {"channels": 8, "nodes": 5, "gen": "er", "gen_params": {"p": 0.5}}


def make_cfg(name="randwire_small", builder="build_randwire_fpn_backbone", extra=None, opts=()):
    cfg = get_cfg()
    add_rwdet_config(cfg)
    cfg.merge_from_file(BASE)
    cfg.MODEL.RWDET.EXTRA_KWARGS = CN(extra if extra is not None else TINY)
    cfg.merge_from_list(
        ["MODEL.BACKBONE.NAME", builder, "MODEL.RWDET.NAME", name, "MODEL.FPN.OUT_CHANNELS", 16]
        + list(opts)
    )
    return cfg


# (builder, model name, kwargs); models another issue adds are skipped until registered.
CASES = [
    ("build_randwire_fpn_backbone", "randwire_small", TINY),
    ("build_randwire_fpn_backbone", "randwire_c109", {**TINY, "nodes": 10}),
    ("build_randwire_fpn_backbone", "randwire_c154", {**TINY, "channels": 4, "nodes": 8}),
    ("build_randwire_fpn_backbone", "randwire_small", {**TINY, "wiring": "dnw"}),
    ("build_randwire_fpn_backbone", "randwire_small", {**TINY, "wiring": "popup"}),
    ("build_rwdet_fpn_backbone", "randwire_small", {**TINY, "gen": "ws", "gen_params": {}}),
    ("build_mobilenet_dnw_fpn_backbone", "mobilenetv1_dnw_x0225", {"node_multiplier": 0.125}),
    ("build_mobilenet_dnw_fpn_backbone", "mobilenetv1_rg_x0225", {"node_multiplier": 0.125}),
]
SLOW_CASES = [
    ("build_popup_resnet_fpn_backbone", "resnet50_popup", {}),
]


def _check_backbone(builder, name, kwargs):
    torch.manual_seed(0)
    bb = build_backbone(make_cfg(name, builder, kwargs, ["MODEL.BACKBONE.FREEZE_AT", 0]))
    bottom_up = bb.bottom_up
    model = bottom_up.model
    # Bottom-up: the stride 4..32 stages with the model's own channel counts.
    shapes = bottom_up.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == {
        "conv2": 4,
        "conv3": 8,
        "conv4": 16,
        "conv5": 32,
    }
    assert {k: s.channels for k, s in shapes.items()} == {
        k: model.stage_channels[k] for k in shapes
    }
    # FPN: p2..p6 at strides 4..64.
    out_shapes = bb.output_shape()
    assert {k: s.stride for k, s in out_shapes.items()} == {
        "p2": 4,
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }
    assert all(s.channels == 16 for s in out_shapes.values())
    # The classifier is gone.
    assert not any(k.split(".")[1] in ("head", "fc", "dropout") for k in bb.state_dict())
    # Real tensors have the reported shapes (input padded to FPN's size_divisibility, 32).
    h, w = 64, 96
    assert bb.size_divisibility == 32
    out = bb(torch.randn(2, 3, h, w))
    for k, s in out_shapes.items():
        assert tuple(out[k].shape) == (2, 16, math.ceil(h / s.stride), math.ceil(w / s.stride))
    # No unused parameters (DDP without find_unused_parameters): every trainable one gets a grad.
    sum(v.square().mean() for v in out.values()).backward()
    unused = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


@pytest.mark.parametrize("builder,name,kwargs", CASES, ids=lambda v: str(v)[:40])
def test_backbone_fpn_shapes(builder, name, kwargs):
    _check_backbone(builder, name, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("builder,name,kwargs", SLOW_CASES, ids=lambda v: str(v)[:40])
def test_resnet_backbone_fpn_shapes(builder, name, kwargs):
    _check_backbone(builder, name, kwargs)


def _stage_params(model, names):
    return {id(p) for n in names for p in model.get_submodule(n).parameters()}


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at_freezes_the_first_stages(freeze_at):
    bb = build_backbone(
        make_cfg(opts=["MODEL.BACKBONE.FREEZE_AT", freeze_at, "MODEL.RWDET.NORM", "BN"])
    )
    model = bb.bottom_up.model
    names = model.stage_names
    frozen = _stage_params(model, names[:freeze_at])
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    for i, n in enumerate(names):
        norms = [m for m in model.get_submodule(n).modules() if "Norm" in type(m).__name__]
        assert norms
        want = FrozenBatchNorm2d if i < freeze_at else nn.BatchNorm2d
        assert all(isinstance(m, want) for m in norms), (n, freeze_at)
    # FPN and the frozen stages' state dict keys are unchanged in name (weights still load).
    assert all(p.requires_grad for p in bb.fpn_lateral2.parameters())


def test_freeze_at_covers_parameters_outside_named_stages():
    # MobileNet's stem conv lives outside conv1..conv5: it runs before conv1, so it freezes.
    name = "mobilenetv1_dnw_x0225"
    cfg = make_cfg(
        name,
        "build_mobilenet_dnw_fpn_backbone",
        {"node_multiplier": 0.125},
        ["MODEL.BACKBONE.FREEZE_AT", 1],
    )
    model = build_backbone(cfg).bottom_up.model
    assert not model.stem.weight.requires_grad
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert all(p.requires_grad for p in model.conv2.parameters())


def test_freeze_at_out_of_range():
    with pytest.raises(ValueError, match="FREEZE_AT=6 is out of range"):
        build_backbone(make_cfg(opts=["MODEL.BACKBONE.FREEZE_AT", 6]))


@pytest.mark.parametrize(
    "norm,cls",
    [
        ("FrozenBN", FrozenBatchNorm2d),
        ("BN", nn.BatchNorm2d),
        ("SyncBN", nn.SyncBatchNorm),
        ("GN", nn.GroupNorm),
    ],
)
def test_norm_choice(norm, cls):
    extra = {**TINY, "channels": 64, "nodes": 4}
    cfg = make_cfg(extra=extra, opts=["MODEL.RWDET.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", 0])
    model = build_backbone(cfg).bottom_up.model
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    norms += [m for m in model.modules() if isinstance(m, nn.GroupNorm | FrozenBatchNorm2d)]
    assert norms and all(isinstance(m, cls) for m in norms)


def test_gn_on_a_model_with_its_own_batchnorm_is_an_error():
    name = "mobilenetv1_dnw_x0225"
    cfg = make_cfg(name, "build_mobilenet_dnw_fpn_backbone", {"node_multiplier": 0.125})
    cfg.MODEL.RWDET.NORM = "GN"
    with pytest.raises(ValueError, match="builds its own BatchNorm"):
        build_backbone(cfg)


@pytest.mark.parametrize(
    "opts,match",
    [
        (["MODEL.RWDET.NAME", "randwire_huge"], "not a registered rwdet model"),
        (["MODEL.RWDET.NORM", "LN"], "NORM='LN' is not known"),
        (["MODEL.RWDET.GEN", "xx"], "GEN='xx' is not a known generator"),
        (["MODEL.RWDET.STEM", "tiny"], "STEM='tiny' is not known"),
        (["MODEL.RWDET.STEM", "small"], r"RPN/ROI_HEADS heads read \['p5', 'p6'\].*'small'"),
        (["MODEL.RWDET.GEN", "er", "MODEL.RWDET.K", 4], "takes only"),
        (["MODEL.RWDET.EDGE_DROP", 1.5], "EDGE_DROP=1.5"),
        (["MODEL.RWDET.OUT_FEATURES", ["conv2", "res9"]], "res9"),
        (["MODEL.FPN.IN_FEATURES", ["conv1", "conv3"]], "not among MODEL.RWDET.OUT_FEATURES"),
        (["MODEL.RWDET.NAME", ""], "MODEL.RWDET.NAME is empty"),
        (["MODEL.BACKBONE.NAME", "build_mobilenet_dnw_fpn_backbone"], "not 'randwire_small'"),
    ],
)
def test_unknown_config_values_are_clear_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(make_cfg(opts=opts))


def test_unknown_config_key_is_an_error():
    # yacs: "Non-existent key" (KeyError from files, AssertionError from overrides).
    with pytest.raises((KeyError, AssertionError), match="Non-existent key: MODEL.RWDET.CHANELS"):
        make_cfg(opts=["MODEL.RWDET.CHANELS", 8])


def test_model_rejecting_an_option_is_a_clear_error():
    with pytest.raises(ValueError, match="does not accept the options"):
        build_backbone(make_cfg(extra={**TINY, "colour": "red"}))


def test_fpn_level_check_follows_the_meta_architecture():
    """RetinaNet reads its own levels; a bare backbone is not held to any head's."""
    cfg = make_cfg(opts=["MODEL.META_ARCHITECTURE", "RetinaNet"])
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]  # detectron2's defaults, unused by RetinaNet
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    build_backbone(cfg)
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p7"]
    with pytest.raises(ValueError, match=r"RETINANET heads read \['p7'\]"):
        build_backbone(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    build_backbone(cfg)
