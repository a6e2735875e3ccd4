"""Conv2/4/6/8: the small VGG-like CIFAR-10 networks of edge-popup Table 1.

They are Frankle & Carbin's Conv-2/4/6 (and edge-popup's deeper Conv8): pairs of 3x3 convs
(64,64 | 128,128 | 256,256 | 512,512, padding 1) each followed by a 2x2 max-pool, ReLU after
every layer, then FC 256-256-classes; no BatchNorm. As in the authors' code
(``models/frankle.py``, whose builder makes every layer with ``bias=False``) no layer has a
bias, in every wiring, so the parameter counts below are weights only.

``wiring`` chooses how the weights come about, the same keyword as everywhere in rwdet; the
layer types come from the one wiring registry (``rwdet.nn.wiring``, level ``"weight"``):

- ``"dense"``: ordinary learned weights (the paper's "Learned Dense Weights" baselines);
- ``"popup"``: fixed random weights, edge-popup's top-``keep`` subnetwork per layer (§3);
- ``"supermask"``: fixed random weights, Zhou et al.'s sampled Bernoulli mask (§2, §4.4);
- ``"dnw"``: learned weights of which each layer uses its top-``keep`` ``|w|`` (DNW §3.4; not
  in edge-popup's tables).

The first FC layer reads the flattened last feature map, so its size follows ``input_size``
(32 for CIFAR; 28 for Fashion-MNIST, where four pools of Conv8 leave 1x1). An adaptive pool
would have changed Table 1's counts at 32 px, so none is used; a model run on another size
says which ``input_size`` to build it with.

Parameters at 32x32x3, 10 classes, ``width=1`` (weights; popup/supermask scores, as many again,
are not counted), from Table 1's layer list:

=====  ==========  ================================================
model  parameters  Frankle & Carbin Fig. 2
=====  ==========  ================================================
conv2  4,300,992   4.3M
conv4  2,425,024   2.4M
conv6  2,261,184   1.7M (their figure; Table 1's layers give 2.26M)
conv8  5,275,840   — (not in their work)
=====  ==========  ================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rwdet.models.interface import StagedClassifier, check_dropout, check_num_classes
from rwdet.models.registry import register_model
from rwdet.nn.choose import check_supermask_eval, kept_count, refuse_k
from rwdet.nn.inits import check_init, init_fixed_weight_
from rwdet.nn.wiring import layer_wiring

FC_HIDDEN = 256  # Table 1: FC 256, 256, classes


class ConvNet(StagedClassifier):
    """A Table 1 network (module docstring).

    Args:
        channels: conv width of each stage (one stage = two convs + max-pool).
        width: multiplier of every conv and FC hidden width (Figures 4, 5).
        wiring: "dense", "popup", "supermask" or any wiring registered at level "weight".
        keep: popup/dnw: fraction of each layer's weights KEPT (the paper's k); supermask: only
            sizes the "scaled" init (the fraction kept is learned); dense: unused. ``k=`` is
            refused with a pointer to ``keep=``.
        init: weight distribution (``rwdet.nn.inits.FIXED_INITS``); default U_k
            ("signed_constant", the paper's best) for popup/supermask, N_k ("kaiming_normal",
            the authors' dense baseline) for learned weights.
        scale: the "scaled" variant of ``init`` (§4.5); popup/supermask only.
        eval_mask: supermask evaluation mask (``rwdet.nn.choose.SUPERMASK_EVAL``).
        input_size: side of the square input the FC head is sized for.
        num_classes: 0 builds no classifier (the model returns the 256-d hidden features).
        dropout: before the classifier (timm's ``drop_rate``); the paper uses none.
    """

    def __init__(
        self,
        channels: Sequence[int],
        width: float = 1.0,
        wiring: str = "dense",
        keep: float = 0.5,
        init: str | None = None,
        scale: bool = False,
        eval_mask: str = "threshold",
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        dropout: float = 0.0,
        k: float | None = None,
    ):
        refuse_k(k, "ConvNet (conv2..conv8)")
        super().__init__()
        check_num_classes(num_classes)
        dropout = check_dropout(dropout)
        if init is not None:
            check_init(init)
        kept_count(keep, 1)  # validates keep
        check_supermask_eval(eval_mask)
        self._wiring = layer_wiring(wiring, keep=keep, init=init, scale=scale, eval_mask=eval_mask)
        if init is None:
            init = "kaiming_normal" if self._wiring.learned_weights else "signed_constant"
        if self._wiring.learned_weights and scale:
            raise ValueError(
                "scale=True sizes fixed weights for a subnetwork; use it with "
                f"wiring='popup' or 'supermask', not {wiring!r}"
            )
        if not width > 0:
            raise ValueError(f"width={width!r} must be > 0 (1 is Table 1's network)")
        if int(input_size) < 2 ** len(channels):
            raise ValueError(
                f"input_size={input_size} is too small for {len(channels)} 2x2 max-pools; "
                f"use at least {2 ** len(channels)}"
            )
        self.wiring, self.keep, self.init, self.scale = wiring, float(keep), init, bool(scale)
        self.eval_mask, self.input_size = eval_mask, int(input_size)
        widths = [max(1, round(c * width)) for c in channels]
        hidden = max(1, round(FC_HIDDEN * width))

        side = self.input_size
        self.stage_names, self.stage_channels, self.stage_strides = [], {}, {}
        cin = in_channels
        for i, c in enumerate(widths, start=1):
            name = f"block{i}"
            block = nn.Sequential(
                self._conv(cin, c), nn.ReLU(), self._conv(c, c), nn.ReLU(), nn.MaxPool2d(2)
            )
            setattr(self, name, block)
            self.stage_names.append(name)
            self.stage_channels[name], self.stage_strides[name] = c, 2**i
            cin, side = c, side // 2  # max-pool floors odd sides (28 -> 14 -> 7 -> 3 -> 1)
        self.feature_shape = (cin, side, side)
        self.head = nn.Sequential(
            nn.Flatten(1),
            self._linear(cin * side * side, hidden),
            nn.ReLU(),
            self._linear(hidden, hidden),
            nn.ReLU(),
        )
        self.feature_channels = cin
        self.num_features, self.num_classes = hidden, num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = self.new_classifier(num_classes) if num_classes else nn.Identity()

    def _conv(self, cin: int, cout: int) -> nn.Module:
        return self._layer(cin, cout, conv=True)

    def _linear(self, fin: int, fout: int) -> nn.Module:
        return self._layer(fin, fout, conv=False)

    def _layer(self, cin: int, cout: int, conv: bool) -> nn.Module:
        w = self._wiring
        if conv:
            layer = w.conv_layer(cin, cout, kernel_size=3, padding=1, bias=False)
        else:
            layer = w.linear_layer(cin, cout, bias=False)
        if w.learned_weights:  # the authors' builder inits learned ones with ``init`` too
            init_fixed_weight_(layer.weight, self.init)
        return layer

    def stage_steps(self):
        return [(name, getattr(self, name)) for name in self.stage_names]

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"this model was built for {self.input_size}x{self.input_size} inputs (final "
                f"map {self.feature_shape}), got a final map {tuple(x.shape[1:])}; build it "
                f"with input_size=<the input side>"
            )
        return self.head(x)

    def new_classifier(self, num_classes: int) -> nn.Module:
        return self._linear(self.num_features, num_classes)


TABLE1 = {
    "conv2": (64,),
    "conv4": (64, 128),
    "conv6": (64, 128, 256),
    "conv8": (64, 128, 256, 512),
}


def _factory(name: str):
    def build(**kw) -> ConvNet:
        return ConvNet(TABLE1[name], **kw)

    build.__name__ = name
    build.__doc__ = f"{name[0].upper()}{name[1:]} of edge-popup Table 1 (``rwdet.models.conv``)."
    return build


for _name in TABLE1:
    register_model(_name, input_size="input_size")(_factory(_name))
