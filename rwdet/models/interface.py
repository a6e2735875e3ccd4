"""The timm-style interface every rwdet classifier shares.

A classifier is a chain of named stages (``stage_names``; ``stage_channels`` and
``stage_strides`` keyed by them) followed by a head: pooling to ``num_features`` values,
dropout, and a classifier ``fc``. ``StagedClassifier`` turns that description into the methods
people bring from timm (``forward_features``, ``forward_head``, ``reset_classifier``,
``feature_info``), so the models themselves only say what their stages and head are.
``FeatureListModel`` is what ``build_model(..., features_only=True)`` returns
(``build_model(..., pretrained=path)`` reads files through ``rwdet.models.artifact``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rwdet.nn.execution import log_execution


class FeatureInfo(list):
    """One dict per stage (``num_chs``, ``reduction``, ``module``), plus column accessors.

    A plain list so that code written for timm's ``feature_info`` (which indexes it or iterates
    over dicts) works unchanged; ``channels()``/``reduction()`` save the list comprehension
    when building a neck such as an FPN.
    """

    def _column(self, key: str, idx: int | Sequence[int] | None):
        if idx is None:
            return [d[key] for d in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        """Channel count of each stage (or of stage ``idx``)."""
        return self._column("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        """Input-to-feature-map stride of each stage (or of stage ``idx``)."""
        return self._column("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        """Name of the stage module (a key of ``stage_outputs``) of each stage."""
        return self._column("module", idx)


class StagedClassifier(nn.Module, metaclass=abc.ABCMeta):
    """Base class of rwdet classifiers: stages, then ``head`` -> ``dropout`` -> ``fc``.

    A subclass sets ``stage_names``, ``stage_channels``, ``stage_strides``, ``num_features``
    (width of the pooled features the classifier reads) and ``num_classes``, and provides:

    - ``stage_steps()``: ``(stage name, callable)`` pairs run in order (a stem that is not a
      named stage is folded into the first step);
    - ``pool_features(x)``: final feature map -> ``(B, num_features)``;
    - ``new_classifier(num_classes)``: a fresh classifier layer of this model's kind.

    ``head_modules`` names every top-level module of the head, which ``remove_head`` deletes
    so that a feature extractor has no parameters that never receive a gradient.
    """

    head_modules: tuple[str, ...] = ("head", "dropout", "fc")

    @abc.abstractmethod
    def stage_steps(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """``(stage name, callable)`` pairs, run in order."""

    @abc.abstractmethod
    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map -> ``(B, num_features)``."""

    @abc.abstractmethod
    def new_classifier(self, num_classes: int) -> nn.Module:
        """A fresh classifier layer of this model's kind (dense, DNW, popup)."""

    @property
    def feature_info(self) -> FeatureInfo:
        """Every stage's channels, stride and module name, in forward order (as timm models
        carry it), so necks can be sized without running the model."""
        return FeatureInfo(
            {
                "num_chs": int(self.stage_channels[n]),
                "reduction": int(self.stage_strides[n]),
                "module": n,
            }
            for n in self.stage_names
        )

    def forward_stages(self, x: torch.Tensor, stages=None) -> dict[str, torch.Tensor]:
        """The outputs of ``stages`` (default: all) by name; stops after the last one asked
        for, so a detector reading stride 4..32 does not pay for anything after them."""
        wanted = list(self.stage_names) if stages is None else list(stages)
        unknown = [s for s in wanted if s not in self.stage_names]
        if unknown:
            raise ValueError(
                f"{unknown} are not stages of {type(self).__name__}; choose from "
                f"{list(self.stage_names)}"
            )
        out: dict[str, torch.Tensor] = {}
        for name, step in self.stage_steps():
            if len(out) == len(set(wanted)):
                break
            x = step(x)
            if name in wanted:
                out[name] = x
        log_execution(self)  # the stages' execution paths, once (rwdet.nn.execution)
        return {name: out[name] for name in wanted}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final stage's feature map (unpooled), as ``timm``'s ``forward_features``.

        Only the last map is kept alive; use ``stage_outputs``/``features_only`` for several.
        """
        for _, step in self.stage_steps():
            x = step(x)
        log_execution(self)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final feature map -> logits; ``pre_logits=True`` stops before the classifier and
        returns the pooled ``(B, num_features)`` features (after dropout, as timm does)."""
        x = self.dropout(self.pool_features(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The layer mapping pooled features to classes (``nn.Identity`` when
        ``num_classes=0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one for ``num_classes`` classes
        (0: none, the model then returns pooled features), on the model's device and dtype,
        keeping the model's kind of layer (e.g. edge-popup's ``PopupLinear``)."""
        check_num_classes(num_classes)
        fc = self.new_classifier(num_classes) if num_classes > 0 else nn.Identity()
        ref = next(self.parameters(), None)
        if ref is not None:
            fc = fc.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        self.fc = fc
        self.num_classes = num_classes

    def remove_head(self) -> None:
        """Delete pooling, dropout and classifier (for feature extraction and detection)."""
        for name in self.head_modules:
            if name in self._modules:
                delattr(self, name)


def check_num_classes(num_classes) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0 (0: no classifier)")
    return num_classes


def check_dropout(p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout (drop_rate)={p!r} must be in [0, 1)")
    return float(p)


class FeatureListModel(nn.Module):
    """What ``build_model(..., features_only=True)`` returns: the model without its head,
    whose forward gives the feature maps of the stages ``out_indices`` picked, in stage order.

    ``feature_info`` describes exactly the returned maps (timm's convention), so a neck can be
    built from it. The body stays under ``model.`` with its own key names, the layout of the
    Detectron2 backbone's ``bottom_up.model.``.
    """

    def __init__(self, model: StagedClassifier, out_indices: Sequence[int] | None = None):
        super().__init__()
        names = list(model.stage_names)
        n = len(names)
        if out_indices is None:
            out_indices = range(n)
        idx = []
        for i in out_indices:
            if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
                raise ValueError(
                    f"out_indices {tuple(out_indices)} must be stage indices in [0, {n}) "
                    f"(stages {names}, strides {[model.stage_strides[s] for s in names]})"
                )
            idx.append(i % n)
        if len(set(idx)) != len(idx) or not idx:
            raise ValueError(f"out_indices {tuple(out_indices)} must be distinct and non-empty")
        idx.sort()
        info = model.feature_info
        model.remove_head()
        self.model = model
        self.out_indices = tuple(idx)
        self.feature_info = FeatureInfo(info[i] for i in idx)
        self._stages = [names[i] for i in idx]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model.forward_stages(x, self._stages)
        return [feats[s] for s in self._stages]
