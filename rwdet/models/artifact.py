"""The rwdet model artifact: one way to save a model and to rebuild it from any rwdet file.

A model is rebuilt from three things, and a file is only useful if it carries all three:
the registry name and keywords (``ModelSpec.name``/``kwargs``), the stage graphs as explicit
edge lists (never regenerated: a seed fixes them, but a file must not depend on that), and the
weights. ``read_model_file`` accepts every file rwdet writes:

- a classification checkpoint (``tools/train_cls.py``: ``best.pth``, ``last.pth``) or a file
  written by ``save_model`` (weights ``"model"``, or ``"ema"`` where the run kept an EMA);
- a Detectron2 checkpoint (``tools/train_net.py``: ``model_final.pth``) or a ``.pkl`` converted
  by ``tools/convert_cls_to_d2.py``: the backbone part, rebuilt as the classification model
  without a classifier (``num_classes=0``; pass ``num_classes`` for a fresh one);
- a bare state dict, with the ``spec`` given by the caller.

Paths and URIs go through ``rwdet.file_io`` (iopath: local, ``file://``, ``https://``); files
are read with ``torch.load(weights_only=True)`` (``.pkl``: an allow-list unpickler), and the
graphs are checked (``rwdet.models.verify``) before any model is built.

Renamed keywords: files record the build keywords of the day they were written, so keywords
renamed since are translated when a file is read (``upgrade_spec``), never when a caller
passes them (then the model refuses the old name with a pointer to the new one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rwdet.graphs import GraphSpec, graphs_fingerprint, graphs_from_dict, graphs_to_dict
from rwdet.models.registry import CLASSIFIER_MODULES, build_model, get_graphs
from rwdet.run.errors import UserError

__all__ = [
    "ModelFile",
    "ModelSpec",
    "load_model",
    "read_model_file",
    "save_model",
    "upgrade_kwargs",
    "upgrade_spec",
]

FORMAT = "rwdet-model/1"
# Where a Detectron2 file keeps the backbone's spec/graphs and its tensors (rwdet.d2.weights;
# repeated here so that reading a file does not import detectron2).
D2_META_KEY = "rwdet"
D2_BACKBONE_PREFIX = "backbone.bottom_up.model."
_FIX = (
    "pass a file written by tools/train_cls.py (best.pth), tools/train_net.py "
    "(model_final.pth), tools/convert_cls_to_d2.py (.pkl) or rwdet.models.save_model, or a "
    "state dict together with spec="
)


def upgrade_kwargs(kwargs: dict) -> dict:
    """Stored build keywords in today's vocabulary. The fraction of weights kept was ``k``
    (Conv2-Conv8, the sparse ResNets, the neural graphs, and RandWire's popup
    ``wiring_options``) and is ``keep`` since ``k`` also named WS's neighbour count; that one,
    inside ``gen_params``, is left alone. No model ever took another top-level ``k``."""
    out = dict(kwargs)
    if "k" in out:
        if "keep" in out:
            raise UserError(f"stored model keywords hold both k={out['k']!r} and keep=; edit one")
        out = {("keep" if key == "k" else key): v for key, v in out.items()}
    options = out.get("wiring_options")
    if isinstance(options, dict) and "k" in options and "keep" not in options:
        out["wiring_options"] = {("keep" if key == "k" else key): v for key, v in options.items()}
    return out


def upgrade_spec(spec):
    """A stored ``{"name", "kwargs"}`` spec with ``upgrade_kwargs`` applied; anything else is
    returned as it is (its reader reports what is wrong with it)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        return spec
    return {**spec, "kwargs": upgrade_kwargs(spec["kwargs"])}


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model ``build_model`` built, also from inside a ``features_only`` wrapper."""
    return model if hasattr(model, "rwdet_spec") else getattr(model, "model", model)


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a model exactly: registry name, its keywords, its stage graphs."""

    name: str
    kwargs: dict = field(default_factory=dict)
    graphs: dict[str, GraphSpec] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return graphs_fingerprint(self.graphs)

    @classmethod
    def of(cls, model: nn.Module) -> ModelSpec:
        """The spec of a model built by ``build_model`` (any ``features_only`` wrapper too)."""
        inner = _unwrapped(model)
        spec = getattr(inner, "rwdet_spec", None)
        if spec is None:
            raise UserError(
                f"{type(model).__name__} was not built by rwdet.models.build_model, so it has "
                "no spec to save; build it with build_model(name, ...)"
            )
        return cls(spec["name"], dict(spec["kwargs"]), dict(get_graphs(inner)))

    @classmethod
    def from_record(cls, record: dict, where: str, overrides: dict | None = None) -> ModelSpec:
        """The spec stored in a file's record (``model_spec``, ``graphs``,
        ``graphs_fingerprint``), with ``overrides`` applied to the keywords. The graphs must
        hash to the stored fingerprint and be the ones the keywords generate."""
        from rwdet.checkpoint_io import checked_graphs

        stored = record.get("model_spec")
        if not isinstance(stored, dict) or not isinstance(stored.get("name"), str):
            raise UserError(f"{where}: its 'model_spec' is not a dict with 'name' and 'kwargs'")
        kwargs = stored.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise UserError(f"{where}: its model_spec 'kwargs' is not a dict")
        kwargs = {**upgrade_kwargs(kwargs), **(overrides or {})}
        kwargs.pop("graphs", None)
        graphs = checked_graphs(record, where, spec={"name": stored["name"], "kwargs": kwargs})
        return cls(stored["name"], kwargs, dict(graphs or {}))

    def record(self) -> dict:
        """The file entries that store this spec (read back by ``from_record``)."""
        return {
            "model_spec": {"name": self.name, "kwargs": dict(self.kwargs)},
            "graphs": graphs_to_dict(self.graphs),
            "graphs_fingerprint": self.fingerprint,
        }

    def build(self, **overrides) -> nn.Module:
        """``build_model`` with these keywords (and ``overrides``) and exactly these graphs."""
        kwargs = {**self.kwargs, **overrides}
        if self.graphs:
            kwargs["graphs"] = self.graphs
        try:
            model = build_model(self.name, **kwargs)
        except TypeError as e:
            raise UserError(
                f"model {self.name!r} cannot be built with the keywords {sorted(kwargs)}: {e}"
            ) from None
        if self.graphs and graphs_fingerprint(get_graphs(model)) != self.fingerprint:
            raise UserError(f"{self.name}: the rebuilt model's graphs differ from the stored ones")
        return model


@dataclass
class ModelFile:
    """A model file, read and checked: its spec, the chosen weights, and the whole record."""

    path: str
    kind: str  # "checkpoint", "detectron2" or "state_dict"
    spec: ModelSpec
    state: dict[str, torch.Tensor]
    record: dict

    def build(self, strict: bool = False, **overrides) -> nn.Module:
        """The model with these weights. ``overrides`` change build keywords that do not alter
        the weights' shapes (``drop_rate``), or the class count: another ``num_classes`` (or
        0) keeps the classifier freshly initialised, as fine-tuning wants, unless ``strict``.
        Any other mismatch is a ``UserError`` naming a tensor."""
        from rwdet.models.registry import _native_kwargs, model_capabilities

        timm = [overrides.pop(k, None) for k in ("num_classes", "in_chans", "drop_rate")]
        caps = model_capabilities(self.spec.name)
        overrides = _native_kwargs(self.spec.name, caps, overrides, *timm)
        spec = self.spec
        if self.kind == "detectron2" and "num_classes" not in overrides:
            overrides["num_classes"] = 0  # the backbone has no classifier
        if overrides and spec.graphs:  # the new keywords must still generate the stored graphs
            spec = ModelSpec.from_record(spec.record(), repr(self.path), overrides=overrides)
        else:
            spec = ModelSpec(spec.name, {**spec.kwargs, **overrides}, spec.graphs)
        model = spec.build()
        load_weights(model, self.state, repr(self.path), strict=strict)
        return model


STRICT_FIX = "pass strict=False to re-initialise the classifier"
SHAPE_FIX = (
    "pass weights of the same architecture (name, width, nodes, node op), or leave out "
    "keywords that change it to use the file's"
)


def load_weights(
    model: nn.Module,
    state: dict,
    where: str,
    strict: bool = False,
    fixes: tuple[str, str] = (SHAPE_FIX, STRICT_FIX),
) -> list[str]:
    """Load ``state`` into ``model``; returns the classifier modules left freshly initialised.

    Tolerated differences, each for a reason: classifier tensors of another class count (unless
    ``strict``); ``num_batches_tracked`` missing (detectron2's FrozenBatchNorm has none);
    ``weight``/``bias`` of a BatchNorm without affine parameters when they are exactly 1 and 0
    (the converter writes them so detectron2's FrozenBatchNorm can load them). ``fixes``:
    what the error advises for a mismatch outside the classifier, and for one inside it
    under ``strict``.
    """
    state, own = dict(state), model.state_dict()
    for key in [k for k in state if k not in own and k.rsplit(".", 1)[-1] in ("weight", "bias")]:
        module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
            identity = 1.0 if key.endswith("weight") else 0.0
            if torch.equal(state[key], torch.full_like(state[key], identity)):
                del state[key]
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    differ = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    problems = differ + missing + extra
    outside = [k for k in problems if k.split(".")[0] not in CLASSIFIER_MODULES]
    if problems and (strict or outside):
        first = (outside or problems)[0]
        what = "shape differs" if first in differ else "missing" if first in missing else "extra"
        fix = fixes[0] if outside else fixes[1]
        name = getattr(model, "rwdet_spec", {}).get("name", "")
        raise UserError(
            f"{where} does not fit the model {name}: {len(problems)} tensors differ "
            f"(e.g. {first}: {what}); {fix}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in differ},
                          strict=False)  # fmt: skip
    return sorted({k.rsplit(".", 1)[0] for k in problems})


def _as_tensors(state: dict, where: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not torch.is_tensor(v):
            raise UserError(f"{where}: weight {k!r} is a {type(v).__name__}, not a tensor; {_FIX}")
        out[str(k)] = v
    return out


def _read(path: str, where: str):
    from rwdet.checkpoint_io import load_pickle_file, load_torch_file

    if path.endswith(".pkl"):
        return load_pickle_file(path, fix=_FIX)
    return load_torch_file(path, what="model file", fix=_FIX)


def read_model_file(
    path_or_uri, weights: str = "model", spec: ModelSpec | dict | None = None
) -> ModelFile:
    """Read any rwdet model file (see the module docstring) without building the model.

    ``weights``: ``"model"`` or ``"ema"`` (a training checkpoint's EMA weights). ``spec``: for
    a bare state dict only (a ``ModelSpec``, or ``{"name": ..., "kwargs": ...}`` whose graphs
    are generated from its keywords).
    """
    from rwdet.file_io import local_path

    name = os.fspath(path_or_uri)
    where = repr(name)
    data = _read(local_path(name, "model file"), where)
    if not isinstance(data, dict):
        raise UserError(f"{where} holds a {type(data).__name__}, not model weights; {_FIX}")
    if weights not in ("model", "ema"):
        raise ValueError(f"weights={weights!r}: choose 'model' or 'ema'")
    meta = data.get(D2_META_KEY)
    if "model_spec" in data or isinstance(meta, dict):
        if spec is not None:
            raise UserError(f"{where} carries its own model spec; pass keywords, not spec=")
        if "model_spec" in data:
            kind, record = "checkpoint", data
            if weights == "ema" and data.get("ema") is None:
                raise UserError(f"{where} holds no EMA weights (the run had train.ema off)")
            state = data.get(weights)
        else:
            kind, record = "detectron2", meta
            if weights == "ema":
                raise UserError(f"{where} is a Detectron2 file: it holds no EMA weights")
            full = data.get("model", {})
            state = {
                k[len(D2_BACKBONE_PREFIX) :]: v
                for k, v in (full.items() if isinstance(full, dict) else ())
                if str(k).startswith(D2_BACKBONE_PREFIX)
            }
            if not state:
                raise UserError(f"{where} holds no rwdet backbone tensors ({D2_BACKBONE_PREFIX}*)")
        if not isinstance(state, dict):
            raise UserError(f"{where}: its {weights!r} entry is not a state dict; {_FIX}")
        model_spec = ModelSpec.from_record(record, where)
    else:
        if spec is None:
            raise UserError(
                f"{where} is a bare state dict with no model spec; pass spec=ModelSpec(...) or "
                "{'name': ..., 'kwargs': ...}, or a file that carries one"
            )
        kind, record, state = "state_dict", data, data.get("state_dict", data)
        if isinstance(spec, dict):
            graphs = spec.get("graphs")
            spec = ModelSpec(
                spec["name"],
                {k: v for k, v in (spec.get("kwargs") or {}).items() if k != "graphs"},
                graphs_from_dict(graphs) if isinstance(graphs, dict) and "graphs" in graphs
                else dict(graphs or {}),
            )  # fmt: skip
        if not spec.graphs:
            from rwdet.models.verify import spec_graphs

            spec = ModelSpec(spec.name, spec.kwargs, spec_graphs(
                {"name": spec.name, "kwargs": spec.kwargs}))  # fmt: skip
        model_spec = spec
    return ModelFile(name, kind, model_spec, _as_tensors(state, where), record)


def load_model(
    path_or_uri,
    *,
    weights: str = "model",
    spec: ModelSpec | dict | None = None,
    strict: bool = False,
    **overrides,
) -> nn.Module:
    """Rebuild a model from any rwdet model file: ``read_model_file(...).build(...)``.

    >>> model = load_model("output/cls/run/best.pth").eval()
    >>> backbone = load_model("output/det/run/model_final.pth")  # num_classes=0 features
    >>> model = load_model("https://example.org/randwire_c109.pth", num_classes=100)

    ``overrides``: build keywords (timm's ``num_classes``, ``in_chans``, ``drop_rate`` or the
    model's own); another class count leaves a fresh classifier unless ``strict``.
    """
    return read_model_file(path_or_uri, weights=weights, spec=spec).build(strict, **overrides)


def save_model(model: nn.Module, path_or_uri, **extra) -> None:
    """Write ``model`` as an rwdet model file: weights, spec and graphs (``load_model`` reads
    it back). Local paths are written atomically with the user's umask; other URIs through
    their iopath handler. ``extra``: further plain entries (e.g. ``classes=[...]``)."""
    from rwdet.atomic import atomic_write
    from rwdet.file_io import FileURIHandler, PathManager

    data = {
        "format": FORMAT,
        "model": _unwrapped(model).state_dict(),
        **ModelSpec.of(model).record(),
        **extra,
    }
    path = os.fspath(path_or_uri)
    if path.startswith(FileURIHandler.PREFIX):
        path = FileURIHandler()._to_native(path)
    if "://" not in path:
        atomic_write(path, lambda f: torch.save(data, f))
        return
    with PathManager.open(path, "wb") as f:
        torch.save(data, f)
