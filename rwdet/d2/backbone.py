"""rwdet models as detectron2 backbones, with FPN in the manner of ``build_resnet_fpn_backbone``.

Any registered rwdet model with stage features (``ModelCapabilities.features``: RandWire,
MobileNetV1-DNW, the edge-popup ResNets) becomes a bottom-up backbone here, through the same
feature interface as ``build_model(..., features_only=True)``: ``feature_info`` gives channels
and strides, ``stage_outputs`` the maps. The head is removed (``remove_head``), so under DDP
every remaining trainable parameter receives a gradient. The norm layer is detectron2's
``get_norm`` (FrozenBN by default, as in Detectron's fine-tuning): handed to the model as its
``norm_layer`` when its registration declares one, otherwise its BatchNorms are converted after
building.

``MODEL.BACKBONE.FREEZE_AT = k`` freezes everything that runs before the k-th stage output
(stages in ``stage_strides`` order) is ready: its parameters stop requiring gradients and its
BatchNorms become FrozenBN. The modules are found by tracing one small forward pass, so stem
parts outside a named stage (ResNet's ``bn1``, MobileNet's stem conv) are covered too. With
RandWire's conv1 (stride 2) and conv2 (stride 4) Detectron's default k = 2 is exactly
ResNet's stem + res2.
"""

from __future__ import annotations

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from rwdet.d2.spec import BackboneSpec, resolve_backbone_spec
from rwdet.models import build_model, get_graphs
from rwdet.models.interface import StagedClassifier
from rwdet.models.registry import model_capabilities, stage_outputs
from rwdet.nn.execution import set_execution


def frozen_bn(bn: nn.Module) -> FrozenBatchNorm2d:
    """FrozenBN with the BN's statistics (and affine, else identity), no batch counter."""
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    frozen.num_batches_tracked = None
    return frozen


def convert_norm(model: nn.Module, norm: str, name: str) -> nn.Module:
    """Switch the BatchNorms of a model that builds its own (no ``norm_layer`` argument)."""
    if norm == "FrozenBN":
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, child_name, frozen_bn(child))
        return model
    if norm == "SyncBN":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if norm == "BN":
        return model
    raise ValueError(
        f"model {name!r} builds its own BatchNorm layers (no norm_layer argument), so "
        f"MODEL.RWDET.NORM={norm!r} cannot be applied; use FrozenBN, BN or SyncBN"
    )


@torch.no_grad()
def modules_before(model: nn.Module, stage: str, size: int = 64) -> set[nn.Module]:
    """The modules that run before ``stage``'s output exists, from one traced forward pass.

    The stage output is the tensor returned by the module that completes last among those
    returning it (a Sequential and its last child return the same tensor); everything that
    started before that module completed belongs to the stage or to an earlier one.
    """
    called: list[nn.Module] = []
    finished: dict[int, int] = {}
    keep = []

    def pre(m, _inputs):
        called.append(m)

    def post(m, _inputs, out):
        if torch.is_tensor(out):
            keep.append(out)  # keep ids unique while tracing
            finished[id(out)] = len(called)

    mods = [m for m in model.modules() if m is not model]
    handles = [m.register_forward_pre_hook(pre) for m in mods]
    handles += [m.register_forward_hook(post) for m in mods]
    was_training = model.training
    try:
        model.eval()
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        cin = first.in_channels if first is not None else 3
        feats = stage_outputs(model, torch.zeros(1, cin, size, size), [stage])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    end = finished.get(id(feats[stage]))
    if end is None:
        raise ValueError(
            f"cannot tell which modules compute stage {stage!r} of {type(model).__name__}: "
            "its output is not returned by a module; FREEZE_AT needs stage outputs produced "
            "by modules"
        )
    return set(called[:end])


class RwdetBackbone(Backbone):
    """An rwdet model's stage outputs as a detectron2 ``Backbone`` (keys under ``model.``)."""

    def __init__(self, model: nn.Module, out_features, freeze_at: int = 0):
        super().__init__()
        if not isinstance(model, StagedClassifier):
            raise TypeError(
                f"{type(model).__name__} is not an rwdet StagedClassifier; a detection backbone "
                "needs stage features (feature_info, stage outputs)"
            )
        info = {d["module"]: d for d in model.feature_info}
        model.remove_head()
        self.model = model
        self.stage_names = list(info)
        unknown = [f for f in out_features if f not in self.stage_names]
        if unknown:
            raise ValueError(
                f"MODEL.RWDET.OUT_FEATURES {unknown} are not stages of "
                f"{type(model).__name__}; choose from {self.stage_names}"
            )
        self._out_features = list(out_features)
        self._out_feature_channels = {f: info[f]["num_chs"] for f in out_features}
        self._out_feature_strides = {f: info[f]["reduction"] for f in out_features}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> RwdetBackbone:
        if not 0 <= freeze_at <= len(self.stage_names):
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT={freeze_at} is out of range; this backbone has "
                f"{len(self.stage_names)} stages {self.stage_names} (0 freezes nothing)"
            )
        if freeze_at == 0:
            return self
        scope = modules_before(self.model, self.stage_names[freeze_at - 1])
        for m in scope:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if child in scope and isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, frozen_bn(child))
        return self

    def forward(self, x):
        return stage_outputs(self.model, x, self._out_features)


def build_rwdet_bottom_up(cfg, spec: BackboneSpec | None = None) -> RwdetBackbone:
    spec = spec or resolve_backbone_spec(cfg)
    norm = cfg.MODEL.RWDET.NORM
    kwargs = dict(spec.kwargs)
    if spec.graphs:
        kwargs["graphs"] = spec.graphs

    caps = model_capabilities(spec.name)
    if not caps.features:
        raise ValueError(f"model {spec.name!r} has no stage features; it cannot be a backbone")

    if cfg.MODEL.RWDET.EXECUTION != "auto":  # how stages run, not what they are: not recorded
        kwargs["execution"] = cfg.MODEL.RWDET.EXECUTION

    def build(**extra):
        try:
            return build_model(spec.name, **kwargs, **extra)
        except TypeError as e:
            raise ValueError(
                f"model {spec.name!r} does not accept the options {sorted(kwargs)}: {e}"
            ) from None

    if caps.norm_layer:
        model = build(norm_layer=lambda c: get_norm(norm, c))
    else:
        model = convert_norm(build(), norm, spec.name)
    if cfg.MODEL.RWDET.REBUILD_STAGES:
        try:
            set_execution(
                model,
                "rebuild",
                list(cfg.MODEL.RWDET.REBUILD_STAGES),
                fix='remove it from MODEL.RWDET.REBUILD_STAGES ("[]" for none)',
            )
        except ValueError as e:
            raise ValueError(f"MODEL.RWDET.REBUILD_STAGES: {e}") from None
    # What a checkpoint needs to rebuild this backbone exactly.
    model.rwdet_spec = {"name": spec.name, "kwargs": dict(spec.kwargs)}
    model.rwdet_graphs = get_graphs(model)
    return RwdetBackbone(model, cfg.MODEL.RWDET.OUT_FEATURES, cfg.MODEL.BACKBONE.FREEZE_AT)


def _fpn(cfg, bottom_up: Backbone) -> FPN:
    in_features = cfg.MODEL.FPN.IN_FEATURES
    unknown = [f for f in in_features if f not in bottom_up.output_shape()]
    if unknown:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {unknown} are not among MODEL.RWDET.OUT_FEATURES "
            f"{list(bottom_up.output_shape())}"
        )
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    # The FPN levels the configured detector's heads read (a bare backbone: none).
    heads = {
        "GeneralizedRCNN": ("RPN", "ROI_HEADS"),
        "ProposalNetwork": ("RPN",),
        "RetinaNet": ("RETINANET",),
    }.get(cfg.MODEL.META_ARCHITECTURE, ())
    read = {f for h in heads for f in cfg.MODEL[h].IN_FEATURES if f.startswith("p")}
    made = list(fpn.output_shape())
    missing = sorted(read - set(made))
    if missing:
        strides = [bottom_up.output_shape()[f].stride for f in in_features]
        raise ValueError(
            f"FPN over {list(in_features)} (strides {strides}) gives {made}, but the "
            f"{'/'.join(heads)} heads read {missing}. Stage strides depend on the stem "
            f"(MODEL.RWDET.STEM={cfg.MODEL.RWDET.STEM!r}; 'imagenet' gives strides 4..32 for "
            "conv2..conv5); otherwise change MODEL.FPN.IN_FEATURES or the heads' IN_FEATURES"
        )
    return fpn


def _family_fpn(cfg, family: str, prefixes: tuple[str, ...]) -> FPN:
    spec = resolve_backbone_spec(cfg)
    if not spec.name.startswith(prefixes):
        raise ValueError(
            f"build_{family}_fpn_backbone builds {'/'.join(p + '*' for p in prefixes)} models, "
            f"not {spec.name!r}; use build_rwdet_fpn_backbone for any rwdet model"
        )
    return _fpn(cfg, build_rwdet_bottom_up(cfg, spec))


@BACKBONE_REGISTRY.register()
def build_rwdet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Any rwdet model (``MODEL.RWDET.NAME``) + FPN over its stride 4..32 stages + P6 pool."""
    return _fpn(cfg, build_rwdet_bottom_up(cfg))


@BACKBONE_REGISTRY.register()
def build_randwire_fpn_backbone(cfg, input_shape: ShapeSpec):
    """RandWire (small or regular regime, any generator and wiring mode) + FPN."""
    return _family_fpn(cfg, "randwire", ("randwire_",))


@BACKBONE_REGISTRY.register()
def build_mobilenet_dnw_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV1 with a DNW-learned (or random, ``mobilenetv1_rg_*``) graph + FPN."""
    return _family_fpn(cfg, "mobilenet_dnw", ("mobilenetv1_",))


@BACKBONE_REGISTRY.register()
def build_popup_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Edge-popup / DNW-sparse ResNets (``resnet50_popup``, ``resnet50_dnw``, ...) + FPN."""
    return _family_fpn(cfg, "popup_resnet", ("resnet", "wide_resnet"))
