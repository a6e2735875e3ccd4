"""Which rwdet model, with which graphs, a detection config asks for.

Three sources can describe the backbone: ``MODEL.RWDET`` keys, the graph file
``MODEL.RWDET.GRAPH_FILE``, and the spec + graphs embedded in ``MODEL.WEIGHTS`` by
``tools/convert_cls_to_d2.py``. Graph precedence: graph file, then the weights' graphs, then
the generator (GEN/SEED). Wherever two sources say something about the graphs or the
parameter shapes (``ARCH_KEYS``) they must agree; a disagreement is an error naming both
values, never a silent random initialisation. The weights' graphs are used only after their
integrity check (``rwdet.models.verify``); weights of a model with graphs that record none
are refused unless ``MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS``. ``STEM``, ``EDGE_DROP`` and
``EXTRA_KWARGS`` keys outside ``ARCH_KEYS`` are fine-tuning settings: the config's value wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rwdet.d2.config import NORMS, STEMS
from rwdet.d2.weights import read_weights_info
from rwdet.graphs import (
    GENERATORS,
    GraphSpec,
    graphs_fingerprint,
    load_graphs,
)
from rwdet.models import build_model, get_graphs, list_models
from rwdet.models.artifact import upgrade_spec
from rwdet.models.verify import spec_graphs, verify_graphs
from rwdet.run.errors import UserError

logger = logging.getLogger(__name__)

# Options that change parameter shapes or wiring: the config may not contradict the weights.
ARCH_KEYS = ("channels", "nodes", "regime", "node_op", "wiring", "head_channels")


@dataclass
class BackboneSpec:
    name: str
    kwargs: dict
    graphs: dict[str, GraphSpec] | None
    graph_source: str


def _plain(value):
    """CfgNode (a dict subclass) -> plain dicts, so the spec stays JSON-able."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _extra_kwargs(extra) -> dict:
    if not isinstance(extra, dict):
        raise ValueError(
            f"MODEL.RWDET.EXTRA_KWARGS={extra!r} must be a mapping such as "
            "{'wiring_options': {'keep': 0.3}}"
        )
    return _plain(extra)


def _gen_overrides(c, default_gen: str | None = "ws") -> dict:
    """Generator keys the config sets explicitly (the rest stay with weights / defaults).

    K/P/M are checked against ``MODEL.RWDET.GEN``, else ``default_gen`` (the weights'
    generator, else RandWire's "ws"; None: not checked yet)."""
    out = {}
    if c.GEN:
        if c.GEN not in GENERATORS:
            raise ValueError(
                f"MODEL.RWDET.GEN={c.GEN!r} is not a known generator; "
                f"choose one of {sorted(GENERATORS)}"
            )
        out["gen"] = c.GEN
    params = {}
    if c.K > 0:
        params["k"] = int(c.K)
    if c.P >= 0:
        params["p"] = float(c.P)
    if c.M > 0:
        params["m"] = int(c.M)
    gen = c.GEN or default_gen
    if params and gen is not None:
        allowed = set(GENERATORS[gen][1]) if gen in GENERATORS else set()
        bad = sorted(set(params) - allowed)
        if bad:
            raise ValueError(
                f"MODEL.RWDET.{'/'.join(b.upper() for b in bad)} set but generator {gen!r} "
                f"takes only {sorted(allowed) or 'no parameters'}; unset it (0 / -1)"
            )
    if params:
        out["gen_params"] = params
    if c.SEED >= 0:
        out["seed"] = int(c.SEED)
    return out


def validate_rwdet_config(cfg) -> None:
    """Reject unknown values early, with the value and the choices in the message."""
    c = cfg.MODEL.RWDET
    if c.NAME and c.NAME not in list_models():
        raise ValueError(
            f"MODEL.RWDET.NAME={c.NAME!r} is not a registered rwdet model; "
            f"choose one of {list_models()}"
        )
    if c.NORM not in NORMS:
        raise ValueError(f"MODEL.RWDET.NORM={c.NORM!r} is not known; choose one of {NORMS}")
    if c.STEM not in STEMS:
        raise ValueError(f"MODEL.RWDET.STEM={c.STEM!r} is not known; choose one of {STEMS}")
    if not 0.0 <= c.EDGE_DROP < 1.0:
        raise ValueError(f"MODEL.RWDET.EDGE_DROP={c.EDGE_DROP} must be a probability in [0, 1)")
    if not c.OUT_FEATURES:
        raise ValueError("MODEL.RWDET.OUT_FEATURES is empty; list stage names such as conv2")
    _gen_overrides(c, default_gen=None)  # K/P/M: checked once the weights' generator is known
    _extra_kwargs(c.EXTRA_KWARGS)


def _check_agree(what: str, cfg_value, weights_value, weights_path: str) -> None:
    if weights_value is not None and cfg_value != weights_value:
        raise ValueError(
            f"{what}: the config says {cfg_value!r} but MODEL.WEIGHTS={weights_path!r} was "
            f"trained with {weights_value!r} (weights of another architecture). Unset the "
            "config key to use the weights' value, or use weights of this architecture."
        )


UNVERIFIED_FIX = (
    "convert the classification checkpoint again with tools/convert_cls_to_d2.py (it records "
    "the graphs and their fingerprint), or set MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS True to "
    "accept {use}"
)


def weights_graphs(meta: dict | None, weights: str, allow: bool) -> dict[str, GraphSpec] | None:
    """The graphs ``MODEL.WEIGHTS`` records, after the integrity check; None if it records none.

    Every file rwdet writes stores the edge lists with their fingerprint, so edge lists without
    one were edited by hand: refused unless ``allow`` (MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS).
    """
    graphs, fingerprint = (meta or {}).get("graphs"), (meta or {}).get("graphs_fingerprint")
    if not graphs and fingerprint is None:
        return None
    where = f"MODEL.WEIGHTS={weights!r}"
    if fingerprint is None:
        if not allow:
            raise UserError(
                f"{where} holds graph edge lists without their fingerprint, so nothing shows "
                "they are the graphs its tensors were trained with; "
                + UNVERIFIED_FIX.format(use="its unverified edge lists")
            )
        logger.warning("%s: using its graph edge lists unverified (no fingerprint)", where)
    return verify_graphs(graphs, fingerprint, where) or None


def _has_graphs(name: str, kwargs: dict) -> bool:
    try:
        return bool(spec_graphs({"name": name, "kwargs": kwargs}))
    except TypeError:  # an option the model rejects: the build reports it, naming the options
        return False


def resolve_backbone_spec(cfg) -> BackboneSpec:
    validate_rwdet_config(cfg)
    c = cfg.MODEL.RWDET
    weights = cfg.MODEL.WEIGHTS
    meta, rwdet_tensors = read_weights_info(weights)
    wspec = upgrade_spec((meta or {}).get("model_spec"))  # files keep their old keywords
    if meta is not None and wspec is None:
        raise ValueError(
            f"MODEL.WEIGHTS={weights!r} holds a detectron2 ResNet (torchvision layout), not an "
            "rwdet backbone; use it with MODEL.BACKBONE.NAME build_resnet_fpn_backbone "
            "(configs/frcnn_r50_baseline.yaml)"
        )
    name = c.NAME or (wspec or {}).get("name")
    if not name:
        raise ValueError(
            "MODEL.RWDET.NAME is empty and MODEL.WEIGHTS carries no rwdet model spec; set "
            f"MODEL.RWDET.NAME to one of {list_models()} or convert a classification "
            "checkpoint with tools/convert_cls_to_d2.py"
        )
    if wspec:
        _check_agree("MODEL.RWDET.NAME", name, wspec["name"], weights)
    kwargs = dict((wspec or {}).get("kwargs") or {})

    overrides = _gen_overrides(c, kwargs.get("gen") or "ws")
    if c.CHANNELS > 0:
        overrides["channels"] = int(c.CHANNELS)
    if c.NODES > 0:
        overrides["nodes"] = int(c.NODES)
    if c.WIRING:
        overrides["wiring"] = c.WIRING
    if c.NODE_OP:
        overrides["node_op"] = c.NODE_OP
    extra = _extra_kwargs(c.EXTRA_KWARGS)
    if wspec:
        for key in ARCH_KEYS:
            if key in overrides or key in extra:
                value = overrides.get(key, extra.get(key))
                _check_agree(f"MODEL.RWDET {key}", value, kwargs.get(key), weights)
    kwargs.update(extra)
    if c.STEM:
        kwargs["stem"] = c.STEM
    if "edge_drop" in kwargs or c.EDGE_DROP > 0:
        kwargs["edge_drop"] = float(c.EDGE_DROP)
    if int(kwargs.get("in_channels", 3)) != 3:
        raise ValueError(
            f"the backbone spec has in_channels={kwargs['in_channels']}, detection reads RGB; "
            "convert the checkpoint with tools/convert_cls_to_d2.py, which adapts the stem"
        )

    file_graphs = load_graphs(c.GRAPH_FILE) if c.GRAPH_FILE else None
    allow = bool(c.ALLOW_UNVERIFIED_GRAPHS)
    w_graphs = weights_graphs(meta, weights, allow)
    if w_graphs is None and (wspec or rwdet_tensors) and not allow:
        if file_graphs or _has_graphs(name, {**kwargs, **overrides}):
            raise UserError(
                f"MODEL.WEIGHTS={weights!r} holds a {name} backbone but records no graphs "
                "(neither edge lists nor a fingerprint), so its tensors may belong to other "
                "graphs than the ones built here; "
                + UNVERIFIED_FIX.format(use="the graphs the config builds (GRAPH_FILE or GEN/SEED)")
            )
    if file_graphs and w_graphs and graphs_fingerprint(file_graphs) != graphs_fingerprint(w_graphs):
        raise ValueError(
            f"MODEL.RWDET.GRAPH_FILE={c.GRAPH_FILE!r} (fingerprint "
            f"{graphs_fingerprint(file_graphs)}) differs from the graphs embedded in "
            f"MODEL.WEIGHTS={weights!r} ({graphs_fingerprint(w_graphs)}): the weights belong "
            "to other graphs. Use the weights' graphs (unset GRAPH_FILE) or matching weights."
        )
    graphs, source = (file_graphs, "graph file") if file_graphs else (w_graphs, "weights file")
    gen_keys = {k: overrides[k] for k in ("gen", "gen_params", "seed") if k in overrides}
    arch = {k: v for k, v in overrides.items() if k not in gen_keys}
    if graphs is None:
        kwargs.update(overrides)
        return BackboneSpec(name, kwargs, None, "generator")
    kwargs.update(arch)
    if gen_keys:
        # The config names a generator too: it must produce exactly the graphs in use.
        with torch.device("meta"):
            probe = build_model(name, **{**kwargs, **gen_keys})
        got = get_graphs(probe)
        if graphs_fingerprint(got) != graphs_fingerprint(graphs):
            raise ValueError(
                f"MODEL.RWDET generator settings {gen_keys} give graphs (fingerprint "
                f"{graphs_fingerprint(got)}) that differ from the {source}'s graphs "
                f"({graphs_fingerprint(graphs)}); unset MODEL.RWDET.GEN/K/P/M/SEED to use "
                f"the {source}'s graphs, or use weights trained with these graphs"
            )
    logger.info(
        "rwdet backbone %s: graphs from the %s (fingerprint %s)",
        name,
        source,
        graphs_fingerprint(graphs),
    )
    return BackboneSpec(name, kwargs, graphs, source)
