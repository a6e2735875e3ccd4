"""ResNets with a chosen subnetwork: DNW sparse training (DNW Table 4) and edge-popup (§4.6).

torchvision's ResNet with its layers swapped, so the architecture is exactly torchvision's:

- ``resnet50_dnw``: every conv and the FC are ``DNWConv2d``/``DNWLinear`` keeping a fraction
  ``keep`` of their weights (fixed per layer; Table 4's "Weights (%)"); biases and BatchNorm stay
  dense; ``first_layer_dense=True`` keeps the 7x7 stem conv dense (Table 4, "First Layer Dense").
- ``resnet50_popup``, ``resnet101_popup``, ``wide_resnet50_popup``: every conv and the FC are
  edge-popup layers with fixed random weights and learned scores (keep = 0.3, the paper's
  ImageNet k = 30%), BatchNorm is non-affine, the FC has no bias (no learned weights at all).

The layer types come from the one wiring registry (``rwdet.nn.wiring``, level ``"weight"``):
a ResNet takes every wiring registered there. The fraction kept is ``keep=`` (the papers'
``k``; ``k=`` is refused with a pointer, since rwdet's ``k`` is WS's neighbour count).

The stages are ``conv1`` (stem, stride 2) and ``conv2..conv5`` (res2..res5, strides 4..32),
named as in RandWire so the Detectron2 backbone treats every model alike.
"""

from __future__ import annotations

import torch
from torch import nn

from rwdet.models.interface import StagedClassifier, check_dropout, check_num_classes
from rwdet.models.registry import register_model
from rwdet.nn.choose import kept_count, refuse_k
from rwdet.nn.sparse_layers import _check_init
from rwdet.nn.wiring import Wiring, layer_wiring


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
    )


def _swapped(m: nn.Module, wiring: Wiring) -> nn.Module | None:
    """``m`` rebuilt with ``wiring``'s layer type, or None where the wiring keeps its type
    (torchvision's module then stays, with torchvision's initialisation)."""
    if isinstance(m, nn.Conv2d):
        factory, args = wiring.conv_layer, _conv_args(m)
    elif isinstance(m, nn.Linear):
        factory, args = wiring.linear_layer, dict(in_features=m.in_features,
                                                  out_features=m.out_features)  # fmt: skip
    elif isinstance(m, nn.BatchNorm2d):
        return None if wiring.norm_layer is type(m) else wiring.norm_layer(m.num_features)
    else:
        return None
    if factory is type(m):
        return None
    new = factory(**args, bias=m.bias is not None and wiring.learned_weights)
    if wiring.learned_weights:
        new.load_state_dict(m.state_dict())  # keep torchvision's initialisation
    return new


def _swap(model: nn.Module, make) -> None:
    """Replace every submodule ``m`` for which ``make(name, m)`` returns a module."""
    for name, module in list(model.named_modules()):
        new = make(name, module)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class SparseResNet(StagedClassifier):
    """torchvision ResNet whose convs and FC are DNW, edge-popup or supermask layers (or, with
    ``wiring="dense"``, plain ones: the ResNet-50 baseline trained with rwdet's own recipe).

    It adopts the modules of a torchvision ``ResNet`` (so state_dict keys are torchvision's)
    rather than subclassing it: torchvision is imported only when a ResNet is built, which
    keeps ``import rwdet.models`` light.

    Args:
        wiring: "dnw" (sparse training), "popup" (subnetwork of a random network),
            "supermask" (Zhou et al.'s sampled mask of a random network), "dense", or any
            wiring registered at level "weight". The keyword was ``mode`` before; ``mode=`` is
            refused with a pointer to ``wiring``.
        keep: fraction of each layer's weights KEPT (supermask: only sizes a scaled init);
            the keyword was ``k`` before, and ``k=`` is refused with a pointer to ``keep``.
        init, scale: the fixed-weight distribution (``rwdet.nn.inits``).
        first_layer_dense: keep the stem conv an ordinary dense, learned conv.
        stem: "imagenet" (7x7/2 conv + max-pool) or "small" (3x3/1 conv, no pool; 28-32 px).
        num_classes: 0 builds no FC (the model returns pooled ``num_features``).
        dropout: before the FC (timm's ``drop_rate``; torchvision's ResNet has none).
    """

    head_modules = ("avgpool", "dropout", "fc")

    def __init__(
        self,
        layers: list[int],
        width_per_group: int = 64,
        wiring: str = "popup",
        keep: float = 0.3,
        init: str = "signed_constant",
        scale: bool = True,
        first_layer_dense: bool = False,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        dropout: float = 0.0,
        mode: str | None = None,
        k: float | None = None,
    ):
        if mode is not None:
            raise TypeError(f"mode={mode!r}: the keyword is now wiring=; pass wiring={mode!r}")
        refuse_k(k, "SparseResNet")
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        check_num_classes(num_classes)
        dropout = check_dropout(dropout)
        body = ResNet(
            Bottleneck, layers, num_classes=num_classes or 1, width_per_group=width_per_group
        )
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(body, name))
        self.avgpool, self.fc = body.avgpool, body.fc
        layers_of = layer_wiring(wiring, keep=keep, init=init, scale=scale)
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem={stem!r} is not known; use 'imagenet' or 'small'")
        kept_count(keep, 1)  # validates keep
        _check_init(init)
        if stem == "small" or in_channels != 3:
            small = stem == "small"
            self.conv1 = nn.Conv2d(
                in_channels, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False
            )
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            if small:
                self.maxpool = nn.Identity()
        self.wiring, self.keep, self._wiring = wiring, float(keep), layers_of
        self.first_layer_dense = bool(first_layer_dense)

        def make(name, m):
            if name == "conv1" and first_layer_dense:
                return None
            return _swapped(m, layers_of)

        _swap(self, make)
        s = 1 if stem == "small" else 2
        self.stage_names = ["conv1", "conv2", "conv3", "conv4", "conv5"]
        expansion = Bottleneck.expansion
        self.stage_channels = dict(
            zip(
                self.stage_names,
                [64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion],
            )
        )
        self.stage_strides = dict(zip(self.stage_names, [s, 2 * s, 4 * s, 8 * s, 16 * s]))
        self.feature_channels = self.num_features = self.stage_channels["conv5"]
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if num_classes == 0:
            self.fc = nn.Identity()

    def stage_steps(self):
        return [
            ("conv1", lambda x: self.relu(self.bn1(self.conv1(x)))),
            ("conv2", lambda x: self.layer1(self.maxpool(x))),
            ("conv3", self.layer2),
            ("conv4", self.layer3),
            ("conv5", self.layer4),
        ]

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(x), 1)

    def new_classifier(self, num_classes: int) -> nn.Module:
        w = self._wiring
        return w.linear_layer(self.num_features, num_classes, bias=w.learned_weights)


@register_model("resnet50")
def resnet50(**kw) -> SparseResNet:
    """Plain ResNet-50 (torchvision layout): the RandWire Table 3/5 baseline, trained by rwdet's
    trainer with the same recipe, then converted with ``convert_cls_to_d2.py --to d2-resnet``."""
    return SparseResNet(**{"layers": [3, 4, 6, 3], "wiring": "dense", **kw})


@register_model("resnet50_dnw")
def resnet50_dnw(**kw) -> SparseResNet:
    """ResNet-50 trained sparse by DNW (Table 4); keep = fraction of weights kept per layer."""
    return SparseResNet(**{"layers": [3, 4, 6, 3], "wiring": "dnw", "keep": 0.1, **kw})


@register_model("resnet50_popup")
def resnet50_popup(**kw) -> SparseResNet:
    """A subnetwork of a randomly weighted ResNet-50 (edge-popup Figure 8, k = 30%)."""
    return SparseResNet(**{"layers": [3, 4, 6, 3], "wiring": "popup", "keep": 0.3, **kw})


@register_model("resnet101_popup")
def resnet101_popup(**kw) -> SparseResNet:
    return SparseResNet(**{"layers": [3, 4, 23, 3], "wiring": "popup", "keep": 0.3, **kw})


@register_model("wide_resnet50_popup")
def wide_resnet50_popup(**kw) -> SparseResNet:
    """Wide ResNet-50-2: the randomly weighted network whose subnetwork matches ResNet-34."""
    return SparseResNet(
        **{"layers": [3, 4, 6, 3], "width_per_group": 128, "wiring": "popup", "keep": 0.3, **kw}
    )
