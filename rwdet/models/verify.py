"""The graph check every load of a stored model goes through (resume, --weights, conversion,
detection weights): the stored edge lists must be the graphs that were trained.

Graphs travel as explicit edge lists next to a fingerprint of them (``graphs_fingerprint``).
Two things are checked:

1. integrity: the edge lists still hash to the stored fingerprint, so an edited or damaged
   graph whose tensor shapes still fit is refused instead of silently trained or converted;
2. agreement (where the caller knows what it asked for): the graphs that ``spec`` generates
   (registry name + keyword arguments, built on the meta device, no memory, no init) equal the
   stored ones.

Files written before fingerprints were stored pass check 1 with a log line; check 2 still runs.
"""

from __future__ import annotations

import logging

import torch

from rwdet.graphs import GraphSpec, graphs_fingerprint, graphs_from_dict
from rwdet.models.registry import build_model, get_graphs
from rwdet.run.errors import UserError

logger = logging.getLogger(__name__)


class GraphMismatchError(UserError):
    """Stored graphs that are not the ones trained, or not the ones requested."""


def spec_graphs(spec: dict) -> dict[str, GraphSpec]:
    """The stage graphs ``build_model(spec['name'], **spec['kwargs'])`` would build.

    Built on the meta device (no memory, no init) where the model allows it; models whose
    constructor reads tensor values (MobileNet-DNW counts its allowed edges) build on the CPU.
    """
    kwargs = dict(spec.get("kwargs") or {})
    try:
        with torch.device("meta"):
            model = build_model(spec["name"], **kwargs)
    except (RuntimeError, NotImplementedError):
        model = build_model(spec["name"], **kwargs)
    return get_graphs(model)


def verify_graphs(
    graphs_dict: dict | None,
    fingerprint: str | None,
    where: str,
    spec: dict | None = None,
) -> dict[str, GraphSpec]:
    """The stored graphs as ``GraphSpec``s, after checks 1 and 2 (module docstring).

    ``where`` names the file for the error messages. ``graphs_dict`` may be None or empty only
    for models without graphs (then ``spec``, when given, must build none either).
    """
    graphs = graphs_from_dict(graphs_dict) if graphs_dict else {}
    have = graphs_fingerprint(graphs)  # a model without graphs has the empty set's
    if fingerprint is not None and have != fingerprint:
        raise GraphMismatchError(
            f"{where}: its graphs were changed after it was written (the edge lists give "
            f"fingerprint {have}, the file records {fingerprint}); use an unmodified file, or "
            f"the graphs it was trained with"
        )
    if fingerprint is None and graphs:
        logger.info("%s records no graph fingerprint (an older file); graphs %s", where, have)
    if spec is not None:
        want_fp = graphs_fingerprint(spec_graphs(spec))
        if want_fp != have:
            raise GraphMismatchError(
                f"{where} holds graphs {have} but the requested model "
                f"({spec['name']} {spec.get('kwargs') or {}}) has graphs {want_fp}; pass the "
                f"generator, parameters and seed the file was trained with"
            )
    return graphs
