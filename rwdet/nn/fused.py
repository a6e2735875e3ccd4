"""A whole sepconv stage as one autograd op that keeps one tensor per node for backward.

Autograd run node by node keeps four activations per RandWire node (ReLU output, depthwise
output, pointwise output, BN output). Backward needs less:

- BN backward needs its input ``C_v`` (the pointwise output) and the batch statistics: kept.
- The node output ``Z_v = BN(C_v)`` is one per-channel multiply-add of ``C_v``: rebuilt each
  time a child's backward needs it, and dropped after. (Cached from a parent's last child to
  its first, the rebuilt outputs held up to half of C=109's stage at once, 15 of 32 node
  tensors, on top of the gradients; that was the detector's peak under
  ``execution="rebuild"``, which keeps no ``C_v`` and reruns the forward at the start of
  backward.)
- The aggregation ``I_v = sum g_u Z_u``, its ReLU and the 3x3 depthwise conv are cheap (a few
  memory passes and 9 MACs per element, against the pointwise conv's ``C`` MACs per element):
  recomputed in the node's backward. The pointwise conv, the expensive part, never runs twice.

So a stage keeps ``C_v`` per node (one tensor, exact in any dtype) instead of four, and the
backward also fuses what autograd does in steps: a parent's gradient is accumulated in place as
``grad_Z_u += g_uv * grad_I_v`` (no per-edge temporary), and ``dL/dg_uv = <Z_u, grad_I_v>``.

BN running statistics are updated once, in forward, exactly as ``nn.BatchNorm2d`` does.

A node may instead end in detectron2's ``FrozenBatchNorm2d`` (the detection configs' norm, as in
Detectron's fine-tuning): a fixed per-channel affine ``Z = C * s + t`` with no batch statistics
and no trainable parameters. It is handled the same way — ``C_v`` kept, ``Z_v`` rebuilt — with
the affine applied exactly as ``FrozenBatchNorm2d.forward`` applies it when gradients are needed
(``s, t`` computed in the buffers' dtype, cast to ``C``'s, one multiply and one add), and
``dL/dC = dL/dZ * s``. Without this the detector's stages kept four tensors per node.

The forward math is not written here: the op runs the stage's own aggregation
(``GraphStage.aggregate``, ``rwdet.nn.aggregate``), each node op's own layers and the stage's
sink mean, and applies BatchNorm through ``torch.native_batch_norm`` — the kernel
``nn.BatchNorm2d`` calls — because backward needs the batch statistics the module does not
return. Only the backward (and its recomputation of each node's input side) is its own.

Which stages run it is decided in ``rwdet.nn.execution`` (``execution="fused"`` or ``"auto"``):
every node a plain sepconv op (``nn.Conv2d`` + ``nn.BatchNorm2d`` in training mode, or +
``FrozenBatchNorm2d``; ``unfusable_reason`` says why not), in a training step. Equivalence to
the reference path — outputs, every gradient, BN buffers — is tested on ER, BA and WS graphs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from rwdet.nn.aggregate import _dot
from rwdet.nn.node_ops import SepConvOp


@dataclass
class StagePlan:
    """What the op needs to know about a stage besides tensors (built by ``fused_stage``)."""

    stage: nn.Module  # the GraphStage: its aggregation and node ops compute the forward
    in_edges: list[list[tuple[int, int]]]  # per node: [(edge index, parent), ...]
    sinks: list[int]
    stride: int
    bn_eps: list[float]
    bn_factor: list[float]  # running-stat update factor of each node's BN this step
    running: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # (mean, var) per node
    unit_edges: frozenset[int]  # edges whose gate is identically 1
    frozen: list[bool]  # per node: FrozenBatchNorm2d (params hold its scale, shift), else BN
    rebuild: bool = False  # keep no C_v: backward reruns the forward first (execution "rebuild")


def is_frozen_bn(module: nn.Module) -> bool:
    """detectron2's ``FrozenBatchNorm2d``. Looked up among the modules already imported: a model
    can hold one only once detectron2 is loaded, and classification never has to import it."""
    layers = sys.modules.get("detectron2.layers.batch_norm")
    return layers is not None and type(module) is getattr(layers, "FrozenBatchNorm2d", None)


def frozen_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``FrozenBatchNorm2d(C) = C * s + t``, computed as its forward does."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    return scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)


def _frozen_apply(c, scale, shift):
    return c * scale.to(c.dtype) + shift.to(c.dtype)


def unfusable_reason(op: nn.Module) -> str | None:
    """Why the fused op cannot compute node op ``op`` exactly (None: it can). It computes
    plain sepconv: ``nn.Conv2d`` layers and a training-mode ``nn.BatchNorm2d`` or a FrozenBN."""
    if type(op) is not SepConvOp:
        return f"is a {type(op).__name__}, not the sepconv op"
    _, dw, pw, bn = op
    for conv in (dw, pw):
        if type(conv) is not nn.Conv2d:
            return f"has {type(conv).__name__} layers (popup/DNW layers), not nn.Conv2d"
        if conv.bias is not None or conv.padding_mode != "zeros":
            return "has a convolution with a bias or non-zero padding"
    if is_frozen_bn(bn):
        return None
    if type(bn) is not nn.BatchNorm2d:
        return f"ends in {type(bn).__name__}, not nn.BatchNorm2d or FrozenBatchNorm2d"
    if not bn.training:
        return "has its BatchNorm2d in eval mode while the stage trains"
    return None


def fusable(op: nn.Module) -> bool:
    """A node op the fused path computes exactly (``unfusable_reason`` says why not)."""
    return unfusable_reason(op) is None


def bn_factor(bn: nn.BatchNorm2d) -> float:
    """Count the step and return the running-stat factor, as ``_BatchNorm.forward`` does."""
    if not bn.track_running_stats:
        return 0.0
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def _bn_apply(c, mean, invstd, weight, bias):
    """``Z = BN(C)`` again from the saved batch statistics (eval-mode BN with ``var = invstd^-2``
    and ``eps = 0``): per-channel math in fp32 even for bf16/fp16 ``C``, as in the forward."""
    return torch.batch_norm(c, weight, bias, mean, invstd.pow(-2), False, 0.0, 0.0, True)


def _like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``param``'s dtype and exact strides. A conv run on channels_last input gives
    an NCHW weight a gradient whose strides differ on its size-1 dims; DDP's gradient buckets
    compare strides exactly and would warn and copy every step."""
    if grad.dtype == param.dtype and grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


def _run_nodes(plan: StagePlan, x, gates, bn, keep_c: bool = True):
    """The stage's forward, computed by the stage itself: ``GraphStage.relu_input`` (the one
    aggregation, then ReLU) and each node op's own layers in its order (depthwise -> pointwise),
    ending at ``C_v``; ``bn(v, C_v)`` then gives ``Z_v`` and keeps the batch statistics that
    ``nn.BatchNorm2d`` does not return. Returns every ``C_v`` (None without ``keep_c``), their
    dtypes and ``GraphStage.sink_mean``.

    ``relu_input`` works in place wherever nothing else reads: autograd records nothing
    inside the op's forward.
    """
    stage = plan.stage
    outs: dict[int, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    keep, dtypes = ([] if keep_c else None), []
    for v, op in enumerate(stage.nodes):
        _, dw, pw, _ = op
        a = stage.relu_input(v, x, outs, gates, shared)
        b = dw(a)
        del a
        c = pw(b)
        del b
        dtypes.append(c.dtype)
        outs[v] = bn(v, c)
        if keep is not None:
            keep.append(c)
        del c
        for u in stage.release_after[v]:
            del outs[u]
    return keep, dtypes, stage.sink_mean(outs)


class SepConvStage(torch.autograd.Function):
    """Inputs: ``plan, x, gates, *params`` with params ``(dw, pw, bn_weight, bn_bias)`` per node."""

    @staticmethod
    def forward(ctx, plan: StagePlan, x, gates, *params):
        stats = []

        def bn(v, c):
            if plan.frozen[v]:
                stats.extend((None, None))
                return _frozen_apply(c, params[4 * v + 2], params[4 * v + 3])
            rm, rv = plan.running[v]
            z, mean, invstd = torch.native_batch_norm(
                c, params[4 * v + 2], params[4 * v + 3], rm, rv, True, plan.bn_factor[v],
                plan.bn_eps[v],
            )  # fmt: skip
            stats.extend((mean, invstd))
            return z

        # "rebuild": no C_v kept, backward reruns the forward for them (as a second backward)
        keep, ctx.conv_dtypes, out = _run_nodes(plan, x, gates.detach(), bn, not plan.rebuild)
        dev = x.device.type
        ctx.plan = plan
        # A second backward reruns the forward outside the caller's autocast: re-entered then.
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, gates, *params, *stats)
        # Not ``save_for_backward``: backward drops each C_v as soon as its node is done, which
        # a saved tensor cannot do (it lives until the whole op's backward returns).
        ctx.keep = keep
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        plan: StagePlan = ctx.plan
        n = len(plan.in_edges)
        x, gates, *rest = ctx.saved_tensors
        params, stats = rest[: 4 * n], rest[4 * n :]
        need = ctx.needs_input_grad
        g = gates.detach().unbind()
        keep, ctx.keep = ctx.keep, None

        def z_from(v, c):
            bw, bb = params[4 * v + 2], params[4 * v + 3]
            if plan.frozen[v]:
                return _frozen_apply(c, bw, bb)
            return _bn_apply(c, stats[2 * v], stats[2 * v + 1], bw, bb)

        if keep is None:  # "rebuild", or a second backward (retain_graph): C from the input
            dev, enabled, dtype = ctx.autocast
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                keep, _, _ = _run_nodes(plan, x, gates.detach(), z_from)

        # grads[v] = (tensor, owned): owned buffers are accumulated in place; the sinks share
        # one (read-only) tensor until something is added to it.
        share = grad_out / len(plan.sinks) if len(plan.sinks) > 1 else grad_out
        grads: dict[int, tuple[torch.Tensor, bool]] = {s: (share, False) for s in plan.sinks}

        def add_grad(u, t, scale):
            """``grad_Z_u += scale * t``; ``scale=None`` (a unit edge) hands ``t`` over whole."""
            buf, owned = grads.get(u, (None, False))
            if buf is None:
                grads[u] = (t, True) if scale is None else (t * scale, True)
            elif owned:
                buf.add_(t) if scale is None else buf.addcmul_(t, scale)
            else:
                grads[u] = (buf + t if scale is None else torch.addcmul(buf, t, scale), True)

        grad_params: list[torch.Tensor | None] = [None] * (4 * n)
        grad_gates = torch.zeros_like(gates) if need[2] else None
        grad_x = None
        for v in reversed(range(n)):
            dw, pw, bw, bb = params[4 * v : 4 * v + 4]
            ins = plan.in_edges[v]
            # Recompute the node's input side: aggregation (the stage's own), ReLU, depthwise.
            parents = [z_from(u, keep[u]) for _, u in ins]
            i = plan.stage.aggregate(v, x, {u: z for (_, u), z in zip(ins, parents)}, gates)
            a = F.relu(i) if i is x or any(i is z for z in parents) else i.relu_()
            del i
            s = plan.stride if not ins else 1
            cdt = ctx.conv_dtypes[v]
            a_c, dw_c, pw_c = a.to(cdt), dw.to(cdt), pw.to(cdt)
            b = F.conv2d(a_c, dw_c, stride=s, padding=1, groups=dw.shape[0])
            gz, _ = grads.pop(v)
            if plan.frozen[v]:  # Z = C * s + t: autograd's MulBackward, s in C's dtype
                grad_c = gz.to(keep[v].dtype) * bw.to(keep[v].dtype)
                grad_bw = grad_bb = None
            else:
                rm, rv = plan.running[v]
                grad_c, grad_bw, grad_bb = torch.ops.aten.native_batch_norm_backward(
                    gz.to(keep[v].dtype),
                    keep[v],
                    bw,
                    rm,
                    rv,
                    stats[2 * v],
                    stats[2 * v + 1],
                    True,
                    plan.bn_eps[v],
                    [
                        True,
                        bw is not None and need[3 + 4 * v + 2],
                        bb is not None and need[3 + 4 * v + 3],
                    ],
                )
            del gz
            keep[v] = None
            grad_b, grad_pw, _ = torch.ops.aten.convolution_backward(
                grad_c, b, pw_c, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [True, need[3 + 4 * v + 1], False],
            )  # fmt: skip
            del b, grad_c
            grad_a, grad_dw, _ = torch.ops.aten.convolution_backward(
                grad_b, a_c, dw_c, None, [s, s], [1, 1], [1, 1], False, [0, 0], dw.shape[0],
                [True, need[3 + 4 * v], False],
            )  # fmt: skip
            del grad_b, a_c
            grad_i = torch.ops.aten.threshold_backward(grad_a.to(a.dtype), a, 0)
            del grad_a, a
            for j, gp in enumerate((grad_dw, grad_pw, grad_bw, grad_bb)):
                if gp is not None:
                    grad_params[4 * v + j] = _like(gp, params[4 * v + j])
            if not ins:
                if need[1]:
                    grad_x = grad_i if grad_x is None else grad_x.add_(grad_i)
                continue
            for (e, u), z in zip(ins, parents):
                if e in plan.unit_edges:  # gate identically 1: no gradient, no multiply
                    add_grad(u, grad_i, None)
                    continue
                if grad_gates is not None:
                    grad_gates[e] = _dot(grad_i, z).to(gates.dtype)
                add_grad(u, grad_i, g[e].to(grad_i.dtype))
            del parents, grad_i
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return (None, grad_x, grad_gates, *grad_params)


def fused_stage(stage, x: torch.Tensor, gates: torch.Tensor, rebuild: bool = False):
    """Run ``stage`` (a ``GraphStage`` whose nodes are all ``fusable``) through the fused op;
    ``rebuild``: keep no ``C_v`` between forward and backward (execution ``"rebuild"``)."""
    params, eps, factor, running, frozen = [], [], [], [], []
    for op in stage.nodes:
        _, dw, pw, bn = op
        frozen.append(is_frozen_bn(bn))
        if frozen[-1]:  # a constant affine: its (scale, shift) take the BN parameters' place
            params += [dw.weight, pw.weight, *frozen_affine(bn)]
            factor.append(0.0)
            running.append((None, None))
        else:
            params += [dw.weight, pw.weight, bn.weight, bn.bias]
            factor.append(bn_factor(bn))
            running.append((bn.running_mean, bn.running_var))
        eps.append(bn.eps)
    plan = StagePlan(
        stage,
        stage.in_edges,
        stage.sinks,
        stage.stride,
        eps,
        factor,
        running,
        stage.gates.unit_edges,
        frozen,
        rebuild,
    )
    return SepConvStage.apply(plan, x, gates, *params)
