"""RandWire networks (Xie et al. 2019, Table 1): stages are random graphs, one per stage.

small regime:   conv1 3x3 Conv-BN C/2 s2 | conv2 ReLU-Conv-BN 3x3 C s2 | N-node stages C, 2C, 4C
regular regime: conv1 3x3 Conv-BN C/2 s2 | stages N/2 nodes C, then N nodes 2C, 4C, 8C
classifier:     ReLU, 1x1 conv 1280, BN, ReLU, global average pool, [dropout], FC
"""

from __future__ import annotations

import torch
from torch import nn

from rwdet.complexity.width import matched_width
from rwdet.graphs import GraphSpec, check_params, stage_seed
from rwdet.models.interface import StagedClassifier, check_dropout, check_num_classes
from rwdet.models.registry import register_model
from rwdet.nn.execution import refuse_old_keywords
from rwdet.nn.stage import GraphStage
from rwdet.nn.wiring import get_wiring


class RandWire(StagedClassifier):
    """A RandWire classifier; stages ``conv1..conv5`` at strides 2..32 (``feature_info``).

    Args:
        regime: "small" or "regular" (Table 1).
        channels: C. nodes: N.
        gen, gen_params, seed: the stage graphs' generator; stage i uses ``stage_seed(seed, i)``.
        graphs: explicit ``{stage name: GraphSpec}`` (from a checkpoint); overrides gen/seed.
        num_classes: 0 builds no classifier (the model returns pooled ``num_features``).
        dropout: before the classifier (timm's ``drop_rate``); None: 0.2 regular, 0 small.
        wiring: "static" (RandWire) or a learned mode; wiring_options go to its factory.
        stem: "imagenet" (conv1, conv2 downsample, output stride 32) or "small" for 28-32 px
            inputs (the first two downsamplings removed, output stride 8).
        execution: how the stages run a training step (``rwdet.nn.execution``): "auto"
            (the fused op where a stage allows it, about half the peak memory), "reference",
            "recompute", "fused" or "rebuild" (the fused op rerunning the forward in backward;
            per stage: ``rwdet.nn.set_execution``); every one gives the reference's results.
            ``fused=`` and ``recompute=`` are refused with a pointer to it.
    """

    def __init__(
        self,
        regime: str = "small",
        channels: int = 78,
        nodes: int = 32,
        gen: str = "ws",
        gen_params: dict | None = None,
        seed: int = 1,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float | None = None,
        edge_drop: float = 0.0,
        wiring: str = "static",
        wiring_options: dict | None = None,
        node_op: str = "sepconv",
        stem: str = "imagenet",
        graphs: dict | None = None,
        norm_layer=None,
        head_channels: int = 1280,
        execution: str = "auto",
        fused=None,
        recompute=None,
    ):
        super().__init__()
        refuse_old_keywords(fused, recompute)
        if regime not in ("small", "regular"):
            raise ValueError(f"regime={regime!r} is not known; use 'small' or 'regular'")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem={stem!r} is not known; use 'imagenet' or 'small'")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels={channels!r} must be a positive integer")
        check_num_classes(num_classes)
        mode = get_wiring(wiring, **(wiring_options or {}))
        conv = mode.conv_layer
        norm = norm_layer or mode.norm_layer
        c = channels
        s1 = 1 if stem == "small" else 2
        if regime == "small":
            plan = [
                ("conv3", nodes, c, c),
                ("conv4", nodes, c, 2 * c),
                ("conv5", nodes, 2 * c, 4 * c),
            ]
        else:
            plan = [
                ("conv2", nodes // 2, c // 2, c),
                ("conv3", nodes, c, 2 * c),
                ("conv4", nodes, 2 * c, 4 * c),
                ("conv5", nodes, 4 * c, 8 * c),
            ]
        gen_params = check_params(gen, max(n for _, n, _, _ in plan), seed, gen_params or {})
        if graphs is not None:
            graphs = {
                k: v if isinstance(v, GraphSpec) else GraphSpec.from_dict(v)
                for k, v in graphs.items()
            }
            expected = {name: n for name, n, _, _ in plan}
            got = {k: g.n for k, g in graphs.items()}
            if got != expected:
                raise ValueError(
                    f"graphs do not fit this architecture: expected stages/nodes {expected}, "
                    f"got {got}; pass graphs saved from the same model"
                )

        self.conv1 = nn.Sequential(
            conv(in_channels, c // 2, 3, stride=s1, padding=1, bias=False), norm(c // 2)
        )
        if regime == "small":
            self.conv2 = nn.Sequential(
                nn.ReLU(), conv(c // 2, c, 3, stride=s1, padding=1, bias=False), norm(c)
            )
        self.stage_names = ["conv1", "conv2", "conv3", "conv4", "conv5"]
        for i, (name, n, cin, cout) in enumerate(plan):
            if graphs is not None:
                spec = graphs[name]
            else:
                spec = GraphSpec.generate(gen, n, stage_seed(seed, i), **gen_params)
            stride = s1 if (regime == "regular" and name == "conv2") else 2
            gates = mode.make_gates(spec, edge_drop)
            stage = GraphStage(
                spec, cin, cout, stride, node_op, gates, conv, norm, execution, name=name
            )
            setattr(self, name, stage)
        last = plan[-1][3]
        strides = [s1, s1 * s1, s1 * s1 * 2, s1 * s1 * 4, s1 * s1 * 8]
        self.stage_channels = {"conv1": c // 2, "conv2": c}
        self.stage_channels.update({name: cout for name, _, _, cout in plan})
        self.stage_strides = dict(zip(self.stage_names, strides))
        self.feature_channels = last
        self.head = nn.Sequential(
            nn.ReLU(),
            conv(last, head_channels, 1, bias=False),
            norm(head_channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        if dropout is None:
            dropout = 0.2 if regime == "regular" else 0.0
        dropout = check_dropout(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._linear_layer = mode.linear_layer
        self.num_features, self.num_classes = head_channels, num_classes
        self.fc = mode.linear_layer(head_channels, num_classes) if num_classes else nn.Identity()
        self.regime = regime
        _init_weights(self)

    def stage_steps(self):
        return [(name, getattr(self, name)) for name in self.stage_names]

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def new_classifier(self, num_classes: int) -> nn.Module:
        fc = self._linear_layer(self.num_features, num_classes)
        _init_weights(fc)
        return fc


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def _with_matched_width(defaults: dict, kw: dict) -> dict:
    """Another node op without an explicit width gets the C that keeps FLOPs near the default."""
    args = {**defaults, **kw}
    op = kw.get("node_op", "sepconv")
    if op != "sepconv" and "channels" not in kw:
        # The probe is the model's regime, nodes and graphs with every other keyword at its
        # default: the width follows the graphs, not the head or stem asked for.
        probe = {k: args[k] for k in ("regime", "nodes", "gen", "gen_params", "seed", "graphs")
                 if k in args}  # fmt: skip
        c = defaults["channels"]
        args["channels"] = matched_width(
            lambda w: RandWire(channels=w, node_op=op, **probe),
            lambda: RandWire(channels=c, node_op="sepconv", **probe),
            c,
            key=("RandWire", c, op, probe),
        )
    return args


@register_model("randwire_small", norm_layer=True)
def randwire_small(**kw) -> RandWire:
    """Small regime (Table 2): C=78, N=32, ~583M FLOPs, ~5.6M params with WS(4, 0.75)."""
    return RandWire(**_with_matched_width({"regime": "small", "channels": 78, "nodes": 32}, kw))


@register_model("randwire_c109", norm_layer=True)
def randwire_c109(**kw) -> RandWire:
    """Regular regime (Table 3): C=109, ~4.0G FLOPs, ~31.9M params."""
    return RandWire(**_with_matched_width({"regime": "regular", "channels": 109, "nodes": 32}, kw))


@register_model("randwire_c154", norm_layer=True)
def randwire_c154(**kw) -> RandWire:
    """Regular regime (Table 3): C=154, ~7.9G FLOPs, ~61.5M params."""
    return RandWire(**_with_matched_width({"regime": "regular", "channels": 154, "nodes": 32}, kw))
