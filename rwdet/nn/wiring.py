"""Wiring modes: how a stage's edges are chosen and which layer types its node ops use.

A mode is three things: a gate factory (per-edge multipliers, ``rwdet.nn.gates``), a conv
layer factory and a norm layer factory. ``static`` is RandWire's; learned modes register
themselves with ``register_wiring`` and plug into the same ``GraphStage``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.gates import EdgeGates, StaticGates


@dataclass
class Wiring:
    name: str
    # (stage graph, edge_drop) -> gate module; the gate module owns the candidate edge list.
    make_gates: Callable[[GraphSpec, float], EdgeGates]
    conv_layer: Callable[..., nn.Module] = nn.Conv2d
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d
    # (in_features, out_features) -> classifier layer (edge-popup swaps in ``PopupLinear``).
    linear_layer: Callable[..., nn.Module] = nn.Linear
    options: dict = field(default_factory=dict)


WIRINGS: dict[str, Callable[..., Wiring]] = {}


def register_wiring(name: str):
    def deco(factory):
        WIRINGS[name] = factory
        return factory

    return deco


@register_wiring("static")
def static_wiring() -> Wiring:
    return Wiring("static", lambda spec, edge_drop: StaticGates(spec.edges, edge_drop))


def get_wiring(name: str, **options) -> Wiring:
    if name not in WIRINGS:
        raise ValueError(f"wiring={name!r} is not known; choose one of {sorted(WIRINGS)}")
    return WIRINGS[name](**options)
