"""An inference-only copy of a model with the per-step work of training taken out.

``fuse_for_inference(model)`` returns a new model (the argument is left as it was, like
``torch.ao.quantization.fuse_modules`` and ``torch.fx.experimental.optimization.fuse`` with
their default ``inplace=False``) that computes the same outputs as ``model`` in eval mode:

- **BatchNorm folded into the convolution before it.** In eval mode BN is the per-channel
  affine ``(y - mean) / sqrt(var + eps) * w + b`` of the conv output ``y``, so it folds into the
  conv's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and the BN becomes
  ``nn.Identity``. RandWire's node op is ReLU -> conv -> BN (RandWire §3.2, "ReLU-conv-BN
  triplet"; the separable conv's depthwise and pointwise halves have nothing between them,
  fn. 5), so every node's BN follows its pointwise conv and folds; so do the stem's (conv -> BN)
  and the head's. detectron2's ``FrozenBatchNorm2d`` (the detectors' norm, also a fixed affine)
  and edge-popup's non-affine BN fold the same way, as does a detectron2 ``Conv2d`` with a
  BN/FrozenBN ``norm``, and torchvision's ResNet and its blocks (``conv1/bn1``, ...; also rwdet's
  ``SparseResNet``), so a baseline can be measured folded too. A BN that does not directly
  follow a conv in a ``Sequential`` is left alone — MobileNetV1-DNW's BN -> ReLU -> depthwise
  conv comes *before* its conv, and folding it forward is not exact at the zero-padded border.
- **The aggregation weights' sigmoid precomputed.** A RandWire stage computes
  ``sigmoid(w_uv)`` for every edge on every forward (``StaticGates``); here the stage gets
  ``FixedGates`` holding those values (single-parent edges stay unit edges: no multiply).
- **DNW / edge-popup layers frozen to their chosen weights** (``rwdet.nn.export``): plain
  convs/linears holding ``weight * mask``, fixed gates, dead nodes removed, so no top-k runs.

The result is for inference only: BN's running statistics are baked into the weights (further
training would not update them) and its ``state_dict`` keys differ from the model's, so keep the
trained checkpoint and fuse at load time (it is deterministic). Differences to eager eval are
fp32 rounding of the folded weights (``tests/test_fuse.py`` checks them).
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rwdet.nn.export import _replace, export_subnetwork
from rwdet.nn.gates import StaticGates
from rwdet.nn.learned_gates import FixedGates
from rwdet.run.errors import UserError


def _frozen_bn_types() -> tuple[type, ...]:
    """The FrozenBN classes of the libraries already imported (a model can only hold one of
    those; importing detectron2 here just to ask would cost seconds)."""
    found = []
    for mod, name in (
        ("detectron2.layers.batch_norm", "FrozenBatchNorm2d"),
        ("torchvision.ops.misc", "FrozenBatchNorm2d"),
    ):
        cls = getattr(sys.modules.get(mod), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _foldable_norm(m: nn.Module) -> bool:
    """A fixed per-channel affine in eval mode: BN with running statistics, or a FrozenBN."""
    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # eval SyncBN is a plain eval BN
        return m.track_running_stats and m.running_mean is not None
    return isinstance(m, _frozen_bn_types())


def _plain_conv(m: nn.Module) -> bool:
    """A conv whose forward is ``F.conv2d`` with its own weight (not a sparse layer's mask)."""
    if type(m) is nn.Conv2d:
        return True
    d2 = sys.modules.get("detectron2.layers.wrappers")
    return d2 is not None and type(m) is d2.Conv2d


def _fold(conv: nn.Module, norm: nn.Module) -> nn.Module:
    # fuse_conv_bn_eval reads running_mean/var, eps, weight, bias: FrozenBN has them as buffers.
    with torch.no_grad():
        return fuse_conv_bn_eval(conv, norm)


def _fold_detectron2_conv(m: nn.Module) -> nn.Module | None:
    """detectron2 ``Conv2d(..., norm=BN)`` (conv, then its ``norm``, then ``activation``)."""
    d2 = sys.modules.get("detectron2.layers.wrappers")
    if d2 is None or type(m) is not d2.Conv2d:
        return None
    norm = getattr(m, "norm", None)
    if norm is None or not _foldable_norm(norm):
        return None
    fused = _fold(m, norm)
    fused.norm = None
    return fused


def _resnet_pairs(m: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) attribute pairs of torchvision's ResNet and its blocks (and rwdet's
    ``SparseResNet``, which adopts them), whose forwards apply ``bnK`` directly to
    ``convK``'s output and use that output nowhere else."""
    types = []
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None:
        types += [resnet.ResNet, resnet.BasicBlock, resnet.Bottleneck]
    sparse = sys.modules.get("rwdet.models.sparse_resnet")
    if sparse is not None:
        types.append(sparse.SparseResNet)
    if type(m) not in types:
        return []
    return [(f"conv{k}", f"bn{k}") for k in (1, 2, 3) if hasattr(m, f"bn{k}")]


def _fold_children(parent: nn.Module) -> None:
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        pairs = list(zip(names, names[1:]))
    else:
        pairs = _resnet_pairs(parent)
    for conv_name, norm_name in pairs:
        conv, norm = parent._modules[conv_name], parent._modules[norm_name]
        if _plain_conv(conv) and getattr(conv, "norm", None) is None and _foldable_norm(norm):
            parent._modules[conv_name] = _fold(conv, norm)
            parent._modules[norm_name] = nn.Identity()


def _fixed_gates(m: nn.Module) -> FixedGates | None:
    if type(m) is not StaticGates:
        return None
    with torch.no_grad():
        gates = FixedGates(m.edges, m())  # eval mode: sigmoid(w), 1 on unit edges, no drop
    gates.unit_edges = m.unit_edges
    return gates.to(m.weight.device)


def _training_module(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m.training:
            return name or "the model"
    return None


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BN folded into the convs, the aggregation weights
    precomputed and DNW/popup layers frozen (module docstring); ``model`` is not changed."""
    training = _training_module(model)
    if training is not None:
        raise UserError(
            f"fuse_for_inference needs a model in eval mode, but {training} is in training mode "
            "(folding bakes BatchNorm's running statistics into the weights); call model.eval() "
            "first"
        )
    new = export_subnetwork(model)  # a copy; DNW/popup -> plain layers and fixed gates
    new = _replace(new, _fixed_gates)
    new = _replace(new, _fold_detectron2_conv)
    for parent in list(new.modules()):
        _fold_children(parent)
    return new.eval().requires_grad_(False)
