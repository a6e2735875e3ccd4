"""Layers and the graph-to-module builder shared by every rwdet model."""

from rwdet.nn import learned_gates  # noqa: F401  (registers "dnw", "popup", "supermask")
from rwdet.nn.execution import set_execution
from rwdet.nn.fuse import fuse_for_inference
from rwdet.nn.gates import EdgeGates, StaticGates
from rwdet.nn.node_ops import NODE_OPS, build_node_op
from rwdet.nn.pad import pad_channels
from rwdet.nn.stage import GraphStage
from rwdet.nn.wiring import WIRINGS, Wiring, get_wiring, layer_wiring, register_wiring

__all__ = [
    "NODE_OPS",
    "WIRINGS",
    "EdgeGates",
    "GraphStage",
    "StaticGates",
    "Wiring",
    "build_node_op",
    "fuse_for_inference",
    "get_wiring",
    "layer_wiring",
    "pad_channels",
    "register_wiring",
    "set_execution",
]
