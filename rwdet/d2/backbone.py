"""rwdet models as detectron2 backbones, with FPN in the manner of ``build_resnet_fpn_backbone``.

Any rwdet model that exposes ``forward_features(x) -> {stage: tensor}``, ``stage_channels`` and
``stage_strides`` (RandWire, MobileNetV1-DNW, the edge-popup ResNets) becomes a bottom-up
backbone here. The classifier is removed, so under DDP every remaining trainable parameter
receives a gradient. The norm layer is detectron2's ``get_norm`` (FrozenBN by default, as in
Detectron's fine-tuning), handed to the model as its ``norm_layer``.

``MODEL.BACKBONE.FREEZE_AT = k`` freezes the first k stages in stage order (conv1, conv2, ...):
their parameters stop requiring gradients and their BatchNorms become FrozenBN. With
RandWire's conv1 (stride 2) and conv2 (stride 4) this is exactly ResNet's stem + res2 for
Detectron's default k = 2.
"""

from __future__ import annotations

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from rwdet.d2.convert import CLASSIFIER_MODULES
from rwdet.d2.spec import BackboneSpec, resolve_backbone_spec
from rwdet.models import build_model, get_graphs


class RwdetBackbone(Backbone):
    """An rwdet model's stage outputs as a detectron2 ``Backbone`` (keys under ``model.``)."""

    def __init__(self, model: nn.Module, out_features, freeze_at: int = 0):
        super().__init__()
        for attr in ("forward_features", "stage_channels", "stage_strides"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"{type(model).__name__} has no {attr!r}; a detection backbone needs "
                    "forward_features, stage_channels and stage_strides"
                )
        for name in CLASSIFIER_MODULES:
            if name in model._modules:
                delattr(model, name)
        self.model = model
        self.stage_names = list(model.stage_strides)
        unknown = [f for f in out_features if f not in self.stage_names]
        if unknown:
            raise ValueError(
                f"MODEL.RWDET.OUT_FEATURES {unknown} are not stages of "
                f"{type(model).__name__}; choose from {self.stage_names}"
            )
        self._out_features = list(out_features)
        self._out_feature_channels = {f: int(model.stage_channels[f]) for f in out_features}
        self._out_feature_strides = {f: int(model.stage_strides[f]) for f in out_features}
        self.freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        return 0

    def freeze(self, freeze_at: int) -> RwdetBackbone:
        if not 0 <= freeze_at <= len(self.stage_names):
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT={freeze_at} is out of range; this backbone has "
                f"{len(self.stage_names)} stages {self.stage_names} (0 freezes nothing)"
            )
        for name in self.stage_names[:freeze_at]:
            stage = self.model.get_submodule(name)
            for p in stage.parameters():
                p.requires_grad_(False)
            frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(stage)
            if frozen is not stage:
                setattr(self.model, name, frozen)
        return self

    def forward(self, x):
        feats = self.model.forward_features(x)
        return {f: feats[f] for f in self._out_features}


def build_rwdet_bottom_up(cfg, spec: BackboneSpec | None = None) -> RwdetBackbone:
    spec = spec or resolve_backbone_spec(cfg)
    norm = cfg.MODEL.RWDET.NORM
    kwargs = dict(spec.kwargs, norm_layer=lambda c: get_norm(norm, c))
    if spec.graphs:
        kwargs["graphs"] = spec.graphs
    try:
        model = build_model(spec.name, **kwargs)
    except TypeError as e:
        raise ValueError(
            f"model {spec.name!r} does not accept the options {sorted(kwargs)}: {e}"
        ) from None
    # What the weights file / checkpoint needs to rebuild this backbone exactly.
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
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


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
