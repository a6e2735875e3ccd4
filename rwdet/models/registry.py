"""Model registry: ``build_model(name, **overrides)`` for every rwdet model.

``build_model`` records the name and overrides on the model (``model.rwdet_spec``) so that a
checkpoint can rebuild the exact architecture; the stage graphs travel separately as edge lists
(``get_graphs``) and are passed back with ``graphs=``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rwdet.graphs import GraphSpec

MODELS: dict[str, Callable[..., nn.Module]] = {}
# Top-level modules that map features to classes in rwdet's classifiers: what detection drops
# and what fine-tuning on another class count re-initialises.
CLASSIFIER_MODULES = ("head", "dropout", "fc", "classifier", "avgpool")


def register_model(name: str):
    def deco(factory):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = factory
        return factory

    return deco


def list_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, **overrides) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not registered; choose one of {list_models()}")
    model = MODELS[name](**overrides)
    model.rwdet_spec = {
        "name": name,
        "kwargs": {k: v for k, v in overrides.items() if k != "graphs"},
    }
    return model


def get_graphs(model: nn.Module) -> dict[str, GraphSpec]:
    """Every stage graph of a model, keyed by the stage's module path."""
    from rwdet.nn.stage import GraphStage

    return {name: m.spec for name, m in model.named_modules() if isinstance(m, GraphStage)}


def stage_outputs(model: nn.Module, x) -> dict:
    """Run ``model.stage_names`` in order; every stage's output by name (for FPN and heads)."""
    feats = {}
    for name in model.stage_names:
        x = getattr(model, name)(x)
        feats[name] = x
    return feats
