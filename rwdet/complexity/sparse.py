"""Complexity of DNW, edge-popup and supermask models: dense vs kept parameters and FLOPs.

``sparse_complexity(model, input_size)`` counts, for one image, in eval mode:

- ``params_dense``: every weight of the network the search runs on — all candidate edges,
  all popup fixed weights, every node op — plus BN affine parameters and biases (learned or
  not). Popup and supermask scores are bookkeeping of the search, not part of the network: reported
  apart as ``score_params``.
- ``params_kept``: only what the found network keeps: chosen weights/edges into live nodes,
  and the ops of live nodes. Ordinary dense layers count their non-zero weights (so an exported
  model with zeroed weights counts the same as the model it came from). A Zhou et al.
  supermask layer keeps what its evaluation mask keeps (``p > 0.5`` by default).
- ``flops_dense`` / ``flops``: multiply-adds of convolutions, fully-connected layers and
  channel-level graph edges (DNW's footnote 1: FLOPs = multiply-adds), dense vs kept. A dead
  node — no real path to the stage output — does no work at inference and is skipped (DNW
  §2.4: "neurons often die ... we may then skip the depthwise convolution"). As in
  ``rwdet.complexity.analytic``, normalisation, activations, pooling and the node-level
  aggregation sums are not counted; for a dense model ``flops == flops_dense ==`` fvcore's count.

A node that lost all real in-edges but still feeds the output is *not* dead: it runs its op on
zeros (its output is a learned constant map), so it is counted.

How a module is counted (no list of layer types to extend):

- A module with a ``kept_counts(cx: KeptContext) -> dict`` method counts itself and everything
  inside it: the learned gate modules (``DNWGates``, ``PopupGates``, ``FixedGates``) and the
  channel-level graphs (MobileNet-DNW's ``NeuralGraph``; DNW Table 1's ``TimedNeuralGraph``,
  per evaluation of ``f`` times the evaluations of one forward — static 1, discrete L,
  continuous the mean NFE so far — reported as ``evaluations``). The dict holds the four
  counts above and, for graphs, ``nodes`` and ``dead_nodes``.
- A weight layer — a ``weight`` of 4 dims (2-D convolution, ``weight[out, in/groups, kh, kw]``)
  or 2 dims (fully connected, ``weight[out, in]``) — keeps the entries of its ``kept_mask()``
  if it has one (every edge-popup, supermask and DNW layer does), else its non-zero weights;
  each kept weight is one multiply-add per output position.
- Any other module: its own parameters, all kept (per-channel ones only for used channels).

``model.sparse_liveness()``, when the model has one, names the channels each module's output
(convolutions, per-channel layers) or input (fully connected) uses downstream; weights of unused
channels do no work. ``GraphStage`` nodes with no path to the stage output keep nothing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from rwdet.complexity.meta import forward_for_shapes
from rwdet.nn.export import stage_live_nodes
from rwdet.nn.stage import GraphStage

COUNT_KEYS = ("params_dense", "params_kept", "flops_dense", "flops")


@dataclass(frozen=True)
class KeptContext:
    """What the counter knows of one module when it asks the module to count itself.

    out_shape: the module's output shape in the counting forward (None: not called, or not a
        tensor).
    used: the channels used downstream (``model.sparse_liveness()[name]``); None: all.
    live_nodes: for the gate module of a ``GraphStage`` (or a module inside it), which of the
        stage's nodes have a path to the stage output; None outside a stage.
    """

    out_shape: torch.Size | None = None
    used: torch.Tensor | None = None
    live_nodes: tuple[bool, ...] | None = None


@torch.no_grad()
def sparse_complexity(model: nn.Module, input_size: int = 224, in_channels: int = 3) -> dict:
    """Dense/kept params and FLOPs of one ``in_channels x input_size^2`` image (module doc).

    The kept weights are read from the model's values; the output shapes come from one
    forward pass (``_output_shapes``).
    """
    with _kept_masks_once(model):
        return _sparse_counts(model, input_size, in_channels)


def _sparse_counts(model: nn.Module, input_size: int, in_channels: int) -> dict:
    shapes = _output_shapes(model, input_size, in_channels)
    liveness = model.sparse_liveness() if hasattr(model, "sparse_liveness") else {}
    dead: set[int] = set()  # ids of modules inside dead nodes
    gate_live: dict[int, tuple[bool, ...]] = {}  # id of a stage's gate module(s) -> live nodes
    nodes = dead_nodes = 0
    for stage in (m for m in model.modules() if isinstance(m, GraphStage)):
        live = tuple(stage_live_nodes(stage))
        gate_live.update((id(m), live) for m in stage.gates.modules())
        nodes += len(live)
        for v, ok in enumerate(live):
            if not ok:
                dead_nodes += 1
                dead.update(id(m) for m in stage.nodes[v].modules())

    r = dict.fromkeys(COUNT_KEYS, 0) | {"score_params": 0}
    for name, m in _counted_modules(model):
        cx = KeptContext(shapes.get(m), liveness.get(name), gate_live.get(id(m)))
        if hasattr(m, "kept_counts"):
            c = dict(m.kept_counts(cx))
            nodes += c.pop("nodes", 0)
            dead_nodes += c.pop("dead_nodes", 0)
            if "evaluations" in c:
                r["evaluations"] = c.pop("evaluations")
        elif _is_weight_layer(m):
            c = _weight_layer_counts(m, cx)
        else:
            c = _own_param_counts(m, cx)
        if isinstance(getattr(m, "scores", None), nn.Parameter):
            r["score_params"] += m.scores.numel()
        if id(m) in dead:
            c["params_kept"] = c["flops"] = 0
        for key in COUNT_KEYS:
            r[key] += int(c[key])
    r.update(input_size=input_size, nodes=nodes, dead_nodes=dead_nodes)
    return r


@contextlib.contextmanager
def _kept_masks_once(model: nn.Module):
    """Within one count no weight changes, so each module's ``kept_mask()`` is computed once:
    MobileNet-DNW's liveness and its graphs' counts each ask for the same top-k of a
    million-entry matrix (tens of ms a time). The memo is an instance attribute shadowing the
    method for the duration of the count."""
    patched = []
    for m in model.modules():
        if callable(getattr(m, "kept_mask", None)) and "kept_mask" not in vars(m):
            m.kept_mask = functools.lru_cache(maxsize=1)(m.kept_mask)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.kept_mask


def _output_shapes(model: nn.Module, input_size: int, in_channels: int) -> dict:
    """Each module's output shape in one eval-mode forward pass (``forward_for_shapes``)."""
    shapes: dict[nn.Module, torch.Size] = {}

    def record(mod, _inputs, out):
        if isinstance(out, torch.Tensor):
            shapes[mod] = out.shape

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        forward_for_shapes(model, (1, in_channels, input_size, input_size), shapes.clear)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _counted_modules(model: nn.Module):
    """``named_modules()``, without what lies inside a module that counts itself."""
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if hasattr(m, "kept_counts"):
            inside.append(name)
        yield name, m


def _is_weight_layer(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() in (2, 4)


def _weight_layer_counts(m: nn.Module, cx: KeptContext) -> dict:
    """Dense and kept weights of a conv (4-D weight) or fully-connected (2-D) layer.

    ``cx.used``: the output channels (conv) or input features (linear) that matter downstream;
    weights elsewhere do no work, and a conv computes its bias only on used channels."""
    conv = m.weight.dim() == 4
    kept = m.kept_mask() if hasattr(m, "kept_mask") else m.weight != 0
    bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
    if cx.used is not None:
        used = cx.used.to(kept.device)
        kept = kept[used] if conv else kept[:, used]
        if conv:
            bias = bias * int(used.sum()) // max(1, m.weight.shape[0])
    dense_w, kept_w = m.weight.numel(), int(kept.sum())
    if conv:  # one multiply-add per weight and output pixel
        positions = cx.out_shape[-1] * cx.out_shape[-2] if cx.out_shape is not None else 0
    else:  # one per weight and sample (the count is for one image)
        positions = 1
    return dict(
        params_dense=dense_w + bias,
        params_kept=kept_w + bias,
        flops_dense=dense_w * positions,
        flops=kept_w * positions,
    )


def _own_param_counts(m: nn.Module, cx: KeptContext) -> dict:
    own = [p for p in m.parameters(recurse=False) if p is not None]
    dense = kept = sum(p.numel() for p in own)
    if cx.used is not None:  # per-channel parameters (BN) of used channels only
        kept = sum(p[cx.used.to(p.device)].numel() for p in own)
    return dict(params_dense=dense, params_kept=kept, flops_dense=0, flops=0)
