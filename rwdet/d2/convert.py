"""Classification checkpoint -> detectron2 weights: the transfer step of the paper's Table 5.

``convert_rwdet_checkpoint`` rebuilds the classification model from the checkpoint's spec and
its own graphs (never regenerated), loads the weights strictly, and writes every non-classifier
tensor under ``BACKBONE_PREFIX``. Three adaptations make a classification model a detection
backbone; each is recorded in the file's metadata:

- **RGB input.** A model trained on 1-channel images (the Fashion-MNIST demo) gets its stem
  convolution's weights replicated over 3 channels and divided by 3. On a grey image
  (R = G = B) the adapted convolution computes exactly what the original did, so the transfer
  is exact there and a sensible start on colour photos.
- **Stem strides.** A model trained with the 28-32 px stem (``stem="small"``, strides 1..8) is
  rebuilt with ``stem="imagenet"`` (strides 2..32) for FPN. The stem's parameters have the same
  shapes in both: the convolution weights transfer, only their strides differ.
- **Normalisation.** Non-affine BatchNorm (edge-popup's default) gets weight 1 and bias 0,
  which is what it computed, so FrozenBN reproduces it without missing keys.

``torchvision_resnet_to_d2`` renames a torchvision-layout ResNet to detectron2's ResNet names
for the ``frcnn_r50_baseline`` config (detectron2's own ResNet + FPN).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rwdet.d2.weights import AUTHOR, BACKBONE_PREFIX, META_KEY, to_numpy_state
from rwdet.graphs import graphs_fingerprint, graphs_to_dict
from rwdet.models import CLASSIFIER_MODULES, ModelSpec, build_model
from rwdet.models.artifact import upgrade_spec

# Child modules that form a classifier (dropped: a detector never uses them, and parameters
# without gradients would break DDP).


def _strip_module_prefix(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_contract(ckpt) -> None:
    if not isinstance(ckpt, dict):
        raise ValueError("not an rwdet classification checkpoint: expected a dict")
    missing = [k for k in ("model", "model_spec", "graphs") if k not in ckpt]
    if missing:
        raise ValueError(
            f"not an rwdet classification checkpoint: missing key(s) {missing}; expected the "
            "dict written by tools/train_cls.py ('model', 'model_spec', 'graphs', ...)"
        )
    spec = ckpt["model_spec"]
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("checkpoint 'model_spec' must be a dict with 'name' and 'kwargs'")


def input_conv(model: nn.Module, in_channels: int) -> tuple[str, nn.Module]:
    """The convolution that reads the image: the first conv a forward pass calls."""
    called: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [
        m.register_forward_pre_hook(lambda mod, _inp: called.append(names[mod]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, 32, 32))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not called:
        raise ValueError("the model has no nn.Conv2d reading its input; cannot adapt channels")
    return called[0], model.get_submodule(called[0])


def _check_same_parameters(name, graphs, state, det_kwargs, stem) -> None:
    """RandWire's and MobileNet's small stems differ from their ImageNet stems only in strides;
    a ResNet's (3x3 conv vs 7x7 conv + max pool) does not, so its weights cannot move over."""
    det = build_model(name, **({"graphs": graphs} if graphs else {}), **det_kwargs)
    target = {k: tuple(v.shape) for k, v in det.state_dict().items()}
    changed = [
        f"{k}: {tuple(state[k].shape)} -> {target[k]}"
        for k in target
        if k in state and tuple(state[k].shape) != target[k]
    ]
    if changed:
        raise ValueError(
            f"model {name!r} trained with stem={stem!r} cannot be converted for detection: "
            f"its ImageNet stem (strides 2..32, needed by FPN) has other parameters "
            f"({', '.join(changed[:3])}); train it with stem='imagenet'"
        )


def convert_rwdet_checkpoint(ckpt: dict, use_ema: bool = False, where: str = "checkpoint") -> dict:
    """An rwdet classification checkpoint (contract dict) -> detectron2 weights dict.

    The stored graphs must hash to the stored fingerprint and be the graphs the stored spec
    generates (``checked_graphs``): an edited edge list whose tensor shapes still fit would
    otherwise be converted and given a fresh, valid-looking fingerprint. ``where`` names the
    file in the errors.
    """
    _check_contract(ckpt)
    spec = upgrade_spec(ckpt["model_spec"])  # keywords renamed since the file was written
    kwargs = dict(spec.get("kwargs") or {})
    model_spec = ModelSpec.from_record(ckpt, where)  # graphs checked against file and spec
    graphs = model_spec.graphs
    state = ckpt["model"]
    if use_ema:
        if not ckpt.get("ema"):
            raise ValueError("--ema was given but the checkpoint holds no EMA weights")
        state = ckpt["ema"]
    state = _strip_module_prefix(dict(state))

    model = model_spec.build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint weights do not fit model {spec['name']!r} with {kwargs}: {e}"
        ) from None
    notes = []

    det_kwargs = dict(kwargs)
    in_channels = int(kwargs.get("in_channels", 3))
    if in_channels != 3:
        if in_channels != 1:
            raise ValueError(
                f"in_channels={in_channels}: only 1-channel (grey) or 3-channel models can be "
                "converted for RGB detection"
            )
        name, conv = input_conv(model, in_channels)
        for key, t in conv.state_dict().items():
            if t.dim() == 4 and t.shape[1] == 1:
                # Weights are divided by 3; per-weight companions (edge-popup scores) copied.
                rep = state[f"{name}.{key}"].repeat(1, 3, 1, 1)
                state[f"{name}.{key}"] = rep / 3.0 if key == "weight" else rep
        det_kwargs["in_channels"] = 3
        notes.append(f"{name}.weight: 1 -> 3 input channels, replicated and divided by 3")
    if kwargs.get("stem", "imagenet") != "imagenet":
        det_kwargs["stem"] = "imagenet"
        _check_same_parameters(spec["name"], graphs, state, det_kwargs, kwargs["stem"])
        notes.append(
            f"stem {kwargs['stem']!r} -> 'imagenet': same parameters, strides 2..32 for FPN"
        )

    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine:
            state[mname + ".weight"] = torch.ones(m.num_features)
            state[mname + ".bias"] = torch.zeros(m.num_features)
    dropped = sorted({k.split(".")[0] for k in state if k.split(".")[0] in CLASSIFIER_MODULES})
    backbone_state = {
        k: v
        for k, v in state.items()
        if k.split(".")[0] not in CLASSIFIER_MODULES and not k.endswith("num_batches_tracked")
    }
    meta = {
        "model_spec": {"name": spec["name"], "kwargs": det_kwargs},
        "source_model_spec": {"name": spec["name"], "kwargs": kwargs},
        "graphs": graphs_to_dict(graphs) if graphs else None,
        "graphs_fingerprint": graphs_fingerprint(graphs) if graphs else None,
        "adaptations": notes,
        "dropped_modules": dropped,
        "source": {
            "epoch": ckpt.get("epoch"),
            "metrics": ckpt.get("metrics"),
            "ema": bool(use_ema),
        },
    }
    return {
        "model": to_numpy_state(backbone_state, BACKBONE_PREFIX),
        "__author__": AUTHOR,
        "matching_heuristics": False,
        META_KEY: meta,
    }


def _tv_name(k: str) -> str | None:
    if k == "conv1.weight":
        return "stem.conv1.weight"
    if m := re.match(r"^bn1\.(.+)$", k):
        return f"stem.conv1.norm.{m[1]}"
    if m := re.match(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$", k):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
    if m := re.match(r"^layer(\d)\.(\d+)\.bn(\d)\.(.+)$", k):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
    if m := re.match(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$", k):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"
    if m := re.match(r"^layer(\d)\.(\d+)\.downsample\.1\.(.+)$", k):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"
    return None


def looks_like_torchvision_resnet(state: dict) -> bool:
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


def torchvision_resnet_to_d2(state: dict) -> dict:
    """A torchvision-layout ResNet state dict -> detectron2 ResNet weights (exact names).

    Use with ``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision strides the 3x3 conv).
    """
    state = _strip_module_prefix(dict(state))
    if not looks_like_torchvision_resnet(state):
        raise ValueError(
            "weights are not a torchvision-layout ResNet (no 'conv1.weight' / "
            "'layer1.0.conv1.weight'); cannot convert to detectron2's ResNet"
        )
    out, unknown = {}, []
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        name = _tv_name(k)
        if name is None:
            unknown.append(k)
        else:
            out["backbone.bottom_up." + name] = v
    if unknown:
        raise ValueError(f"unexpected torchvision ResNet keys {unknown[:5]} (and more?)")
    return {
        "model": to_numpy_state(out),
        "__author__": AUTHOR,
        "matching_heuristics": False,
        META_KEY: {"model_spec": None, "graphs": None, "torchvision_resnet": True},
    }
