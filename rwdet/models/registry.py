"""Model registry: ``build_model(name, **overrides)`` for every rwdet model.

``build_model`` records the name and overrides on the model (``model.rwdet_spec``) so that a
checkpoint can rebuild the exact architecture; the stage graphs travel separately as edge lists
(``get_graphs``) and are passed back with ``graphs=``.

Each registration also declares what the model can do (``ModelCapabilities``): callers such as
the Detectron2 backbone ask the registry instead of probing the model with ``hasattr`` or by
reading exception texts.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.run.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}
# Top-level modules that map features to classes in rwdet's classifiers: what detection drops
# and what fine-tuning on another class count re-initialises.
CLASSIFIER_MODULES = ("head", "dropout", "fc", "classifier", "avgpool")


@dataclass(frozen=True)
class ModelCapabilities:
    """What a registered model supports, declared where it is registered.

    features: it is a ``StagedClassifier`` (stage outputs, ``feature_info``), so it can be
        built ``features_only`` and used as a detection backbone.
    norm_layer: its constructor takes ``norm_layer`` (a ``channels -> module`` factory), so
        detection can hand it detectron2's norms; otherwise its BatchNorms are converted.
    in_chans: the constructor keyword that ``in_chans`` stands for.
    drop_rate: the constructor keyword that ``drop_rate`` (classifier dropout) stands for;
        None when the model has no classifier dropout (``drop_rate`` is then refused).
    input_size: the constructor keyword of a model whose layers depend on the input side
        (edge-popup's Conv2-Conv8 size their FC from it); trainers pass the image size there.
        None: the model takes any input size.
    """

    features: bool = True
    norm_layer: bool = False
    in_chans: str = "in_channels"
    drop_rate: str | None = "dropout"
    input_size: str | None = None


_CAPABILITIES: dict[str, ModelCapabilities] = {}


def register_model(name: str, **capabilities):
    """Register a factory under ``name``; ``capabilities`` are ``ModelCapabilities`` fields."""
    caps = ModelCapabilities(**capabilities)

    def deco(factory):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = factory
        _CAPABILITIES[name] = caps
        return factory

    return deco


def model_capabilities(name: str) -> ModelCapabilities:
    """What model ``name`` supports (the defaults for a factory put into ``MODELS`` directly)."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not registered; choose one of {list_models()}")
    return _CAPABILITIES.get(name, ModelCapabilities())


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters them with shell wildcards
    (``fnmatch``: ``"randwire_*"``, ``"*popup*"``), as timm's ``list_models`` does."""
    names = sorted(MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _native_kwargs(name, caps, kwargs, num_classes, in_chans, drop_rate) -> dict:
    """timm's keyword names translated to the model's own, so the recorded spec (and hence
    every checkpoint) stays in one vocabulary whichever spelling the caller used."""
    kwargs = dict(kwargs)
    for alias, native, value in (
        ("in_chans", caps.in_chans, in_chans),
        ("drop_rate", caps.drop_rate, drop_rate),
    ):
        if value is None:
            continue
        if native is None:
            raise UserError(
                f"model {name!r} has no classifier dropout, so {alias}={value!r} cannot be "
                f"applied; leave {alias} out"
            )
        if native in kwargs and kwargs[native] != value:
            raise ValueError(
                f"{alias}={value!r} and {native}={kwargs[native]!r} name the same setting of "
                f"{name!r}; pass one of them"
            )
        kwargs[native] = value
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def build_model(
    name: str,
    pretrained=None,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    drop_rate: float | None = None,
    features_only: bool = False,
    out_indices=None,
    **kwargs,
) -> nn.Module:
    """Build a registered model with the keywords timm users already know.

    Why one entry point: the returned model carries ``rwdet_spec`` (name and keywords in the
    model's own vocabulary), which is what checkpoints store to rebuild it; building through
    here is what makes a saved model reloadable.

    Args:
        pretrained: None/False for fresh weights; a path or URI of an rwdet model file (see
            ``rwdet.models.artifact``) to start from its weights: its architecture keywords
            and graphs are used, overridden by the keywords given here; another class count
            leaves a fresh classifier. True is refused: rwdet registers no downloadable
            default weights.
        num_classes: classifier outputs; 0 builds no classifier, and the model returns pooled
            ``(B, model.num_features)`` features.
        in_chans, drop_rate: timm's names for the model's ``in_channels`` and classifier
            ``dropout`` keywords (``ModelCapabilities``).
        features_only: return a ``FeatureListModel`` giving the stage feature maps picked by
            ``out_indices`` (default: every stage), with a matching ``feature_info``.
        kwargs: the model's own keywords (``channels``, ``nodes``, ``graphs``, ...).
    """
    caps = model_capabilities(name)
    kwargs = _native_kwargs(name, caps, kwargs, num_classes, in_chans, drop_rate)
    if features_only and not caps.features:
        raise UserError(f"model {name!r} does not declare stage features; features_only=False")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices picks the maps of a features_only model; pass both")
    if pretrained is True:
        raise UserError(
            f"pretrained=True: rwdet registers no default weights for {name!r} (nothing is "
            "downloaded); pass pretrained='output/<run>/best.pth', a checkpoint written by "
            "tools/train_cls.py"
        )
    if pretrained is None or pretrained is False:
        model = MODELS[name](**kwargs)
        model.rwdet_spec = {
            "name": name,
            # graphs travel apart as edge lists; ``execution`` picks how stages run, not what
            # they compute, so a run may resume or be reloaded under another choice.
            "kwargs": {k: v for k, v in kwargs.items() if k not in ("graphs", "execution")},
        }
    elif isinstance(pretrained, (str, os.PathLike)):
        from rwdet.models.artifact import read_model_file

        file = read_model_file(pretrained)
        if file.spec.name != name:
            raise UserError(
                f"{os.fspath(pretrained)!r} holds weights of {file.spec.name!r}, not {name!r}; "
                f"build {file.spec.name!r} with it, or pass a file of {name!r}"
            )
        if "graphs" in kwargs:
            raise UserError(
                f"pretrained={os.fspath(pretrained)!r} brings its own graphs; leave graphs= out"
            )
        model = file.build(**kwargs)  # its rwdet_spec: the file's keywords with these on top
    else:
        raise TypeError(f"pretrained={pretrained!r} must be None, False, True or a path")
    if features_only:
        from rwdet.models.interface import FeatureListModel

        return FeatureListModel(model, out_indices)
    return model


def get_graphs(model: nn.Module) -> dict[str, GraphSpec]:
    """Every stage graph of a model, keyed by the stage's module path."""
    from rwdet.nn.stage import GraphStage

    return {name: m.spec for name, m in model.named_modules() if isinstance(m, GraphStage)}


def stage_outputs(model: nn.Module, x, stages=None) -> dict:
    """Several stages' outputs by name (default: all), for FPNs and analyses; unlike
    ``forward_features``, which keeps only the last map. ``model`` is a ``StagedClassifier``
    (whole or without its head)."""
    return model.forward_stages(x, stages)
