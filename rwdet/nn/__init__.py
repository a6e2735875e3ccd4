"""Layers and the graph-to-module builder shared by every rwdet model."""

from rwdet.nn.gates import EdgeGates, StaticGates
from rwdet.nn.node_ops import NODE_OPS, build_node_op
from rwdet.nn.stage import GraphStage
from rwdet.nn.wiring import WIRINGS, Wiring, get_wiring, register_wiring
from rwdet.nn import learned_gates  # noqa: F401,E402  (registers wirings "dnw", "popup")

__all__ = [
    "NODE_OPS",
    "WIRINGS",
    "EdgeGates",
    "GraphStage",
    "StaticGates",
    "Wiring",
    "build_node_op",
    "get_wiring",
    "register_wiring",
]
