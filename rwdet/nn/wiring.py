"""Wirings: how a network's edges or weights are chosen, and which layer types that takes.

One registry for every model, so that adding a wiring is one ``register_wiring``. A wiring is
a gate factory (per-edge multipliers of a node-level graph, ``rwdet.nn.gates``), a conv, a
linear and a norm layer factory, and whether those layers learn their weights. It acts at one
or both of two levels:

- ``"node"``: RandWire-style stages whose edges join node operations (``GraphStage``). The
  gates choose the edges; the layer factories build every conv, norm and FC of the model.
  ``static`` (RandWire), ``dnw`` (learned edges between dense node ops), ``popup``.
- ``"weight"``: models with no node graph (Conv2-Conv8, the ResNets), where every weight is an
  edge of the network's graph (DNW §3.4, edge-popup §3); only the layer factories are used.
  ``dense``, ``dnw`` (``DNWConv2d``/``DNWLinear``), ``popup``, ``supermask``.

``dnw`` means a different thing at each level, as in the DNW paper (learned node wiring in
§3.1-3.3, sparse weights in §3.4 / Table 4), so it is registered once per level; ``popup``
is one registration for both (the same layers, and at node level the edge gates too).
``static`` and ``dense`` learn every weight of a fixed network; they are two names because
RandWire and the other families have always called their default so.

Layer factories take torch's signatures: ``conv_layer(in, out, kernel_size, stride=...,
padding=..., dilation=..., groups=..., bias=...)``, ``linear_layer(in, out, bias=...)``,
``norm_layer(channels)``. A layer with fixed random weights (``learned_weights=False``) draws
them itself and has no bias.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.nn.gates import EdgeGates, StaticGates

LEVELS = ("node", "weight")
_LEVEL_TEXT = {"node": "node-level graph stages", "weight": "models without node graphs"}


@dataclass(frozen=True)
class Wiring:
    name: str
    # (stage graph, edge_drop) -> gate module that owns the candidate edge list; node level only.
    make_gates: Callable[[GraphSpec, float], EdgeGates] | None = None
    conv_layer: Callable[..., nn.Module] = nn.Conv2d
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d
    linear_layer: Callable[..., nn.Module] = nn.Linear
    # False: the layers hold fixed random weights they draw themselves (popup, supermask), so a
    # model neither re-initialises them nor gives them a bias.
    learned_weights: bool = True
    options: dict = field(default_factory=dict)


# level -> wiring name -> factory(**options) -> Wiring
WIRINGS: dict[str, dict[str, Callable[..., Wiring]]] = {level: {} for level in LEVELS}


def register_wiring(name: str, levels: tuple[str, ...] = ("node",)):
    """Register ``factory(**options) -> Wiring`` under ``name`` at each of ``levels``."""
    bad = [level for level in levels if level not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels={levels!r}: each level must be one of {LEVELS}")

    def deco(factory):
        for level in levels:
            if name in WIRINGS[level]:
                raise ValueError(f"wiring {name!r} is registered twice at level {level!r}")
            WIRINGS[level][name] = factory
        return factory

    return deco


def wiring_names(level: str = "node") -> list[str]:
    return sorted(WIRINGS[level])


def _factory(name: str, level: str) -> Callable[..., Wiring]:
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not known; use one of {LEVELS}")
    if name not in WIRINGS[level]:
        raise ValueError(
            f"wiring={name!r} is not known for {_LEVEL_TEXT[level]}; choose one of "
            f"{wiring_names(level)}"
        )
    return WIRINGS[level][name]


def _checked(wiring: Wiring, name: str, level: str) -> Wiring:
    if level == "node" and wiring.make_gates is None:
        raise ValueError(f"wiring {name!r} registered for level 'node' builds no edge gates")
    return wiring


def get_wiring(name: str, level: str = "node", **options) -> Wiring:
    """The wiring ``name`` at ``level`` with the user's ``options`` (RandWire's
    ``wiring_options``); an option the wiring does not take is an error naming the ones it does."""
    factory = _factory(name, level)
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        named = sorted(p for p in params if p != "k")  # ``k`` is there only to be refused
        raise ValueError(f"wiring={name!r} takes no option {unknown[0]!r}; its options are {named}")
    return _checked(factory(**options), name, level)


def layer_wiring(name: str, **settings) -> Wiring:
    """The weight-level wiring ``name`` for a model whose own keywords (``keep``, ``init``,
    ``scale``, ``eval_mask``) are ``settings``: the factory gets the ones it takes, and None
    leaves the wiring's default. Unlike ``get_wiring``, the rest are not an error: a model has
    every keyword whatever its wiring (``dense`` takes none of them)."""
    factory = _factory(name, "weight")
    params = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in settings.items() if k in params and v is not None})


def _static_gates(spec: GraphSpec, edge_drop: float) -> StaticGates:
    return StaticGates(spec.edges, edge_drop)


@register_wiring("static")
def static_wiring() -> Wiring:
    return Wiring("static", _static_gates)


@register_wiring("dense", levels=("weight",))
def dense_wiring() -> Wiring:
    """Every weight learned (the papers' "Learned Dense Weights" baselines)."""
    return Wiring("dense")
