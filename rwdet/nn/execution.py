"""How a ``GraphStage`` runs: the one place that chooses the execution path, and says which.

One setting, ``execution`` (``GraphStage``, every RandWire model, ``MODEL.RWDET.EXECUTION``):

- ``"reference"``: node by node with plain autograd; every node keeps all its activations for
  backward (four per sepconv node). This is the definition: every other path must give its
  outputs, gradients and BatchNorm buffers (``tests/test_equivalence.py``).
- ``"recompute"``: node by node, each node (aggregation + op) checkpointed in training
  (``rwdet.nn.recompute``): only node outputs stay alive, the rest is rebuilt in backward, one
  extra forward of every node. Any node op, any layer type.
- ``"fused"``: the whole stage as one autograd op (``rwdet.nn.fused``) that keeps one tensor per
  node. Only a stage of plain sepconv nodes (``nn.Conv2d`` + ``nn.BatchNorm2d`` in training
  mode, or detectron2's ``FrozenBatchNorm2d``) can run it.
- ``"rebuild"``: the fused op keeping only the stage input: backward first reruns the stage's
  forward to get the tensors ``fused`` keeps (every conv of the stage runs twice). The least
  memory: nothing of the stage is alive between its forward and its backward, so the stages'
  saved tensors no longer add up at the end of the forward (detection:
  ``MODEL.RWDET.REBUILD_STAGES``). The stages ``fused`` can run, no others.
- ``"auto"`` (default): ``fused`` where the stage can run it, else ``reference``.

The setting governs *training steps* only: a training-mode forward, with gradients enabled,
where something in the stage needs a gradient. Every other forward — eval mode, under
``torch.no_grad()``/``inference_mode`` (precise-BN passes, evaluation), a stage with nothing to
differentiate (detection's ``FREEZE_AT`` stages) — computes node by node as the reference does,
whatever the setting (``INFERENCE``): without a gradient nothing is saved, so there is nothing
for the fused op or for checkpointing to make cheaper; in eval mode with gradients (saliency
maps) the fused op would not even compute the same function, as it applies training-mode
BatchNorm. Tracers — ``torch.compile``, ``torch.jit.trace``/``script``
(fvcore's FLOP count), ONNX export — always get the node path: they cannot record a Python
autograd op.

An explicit ``fused`` or ``rebuild`` that a stage cannot run raises a ``ValueError`` naming
the stage, the reason and the fix: at construction when the reason is already known then (node
op, layer types, norm type; or by ``set_execution``), otherwise at its first training step
(e.g. a BatchNorm switched to eval mode while the stage trains, or BatchNorms converted to
``SyncBatchNorm`` after construction).
``recompute`` applies to every stage and never raises.

The choice is logged once per model (logger ``"rwdet.nn.execution"``) at its first training
step, and again only if it changes, e.g. ``stage execution (auto) in training: fused for
conv3-conv5``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rwdet.nn.aggregate import exporting
from rwdet.nn.fused import unfusable_reason

log = logging.getLogger(__name__)  # under "rwdet", as every rwdet module logs

EXECUTIONS = ("auto", "reference", "recompute", "fused", "rebuild")
REFERENCE, RECOMPUTE, FUSED, REBUILD = "reference", "recompute", "fused", "rebuild"
# The executions that run the fused op, and refuse a stage it cannot compute.
FUSED_OP = (FUSED, REBUILD)
# Not a training step: node by node, as the reference (nothing saved without gradients).
INFERENCE = "inference"
# An INFERENCE forward that autograd does not record at all (no_grad/inference_mode, or nothing
# in the stage needs a gradient) and no tracer watches: ReLUs in place where safe
# (``GraphStage.relu_input``), channels_last on CPU.
UNRECORDED = "unrecorded"

# Bumped whenever a stage's training-step path (or its reason) changes, so a model can tell in
# O(1) per forward that there is nothing new to log.
_changes = 0


def check_execution(value) -> str:
    """``value`` if it is one of ``EXECUTIONS``; otherwise a ``ValueError`` naming them."""
    if value not in EXECUTIONS:
        raise ValueError(f"execution={value!r} is not known; use one of {list(EXECUTIONS)}")
    return value


def refuse_old_keywords(fused=None, recompute=None) -> None:
    """The keywords before ``execution=``: refused with the setting that means the same."""
    for key, value in (("fused", fused), ("recompute", recompute)):
        if value is not None:
            raise TypeError(
                f"{key}={value!r}: the keyword is now execution=; pass execution="
                f"{_old_meaning(fused, recompute)!r} (one of {list(EXECUTIONS)})"
            )


def _old_meaning(fused, recompute) -> str:
    # fused=True (the old default) ran the fused op where possible, recompute elsewhere.
    if recompute and fused is False:
        return RECOMPUTE
    if fused is False:
        return REFERENCE
    return "auto"


def choose(execution: str, *, training: bool, grad: bool, tracing: bool, obstacle) -> str:
    """The decision table. ``grad``: gradients are enabled and something in the stage needs
    one; ``obstacle``: why the fused op cannot run the stage (None when it can). Returns the
    path; an explicit ``fused``/``rebuild`` with an obstacle raises ``ImpossibleExecution``."""
    if not (grad or tracing):  # autograd records nothing: in place where safe (GraphStage)
        return UNRECORDED
    if tracing or not training:
        return INFERENCE
    if execution in (REFERENCE, RECOMPUTE):
        return execution
    if obstacle is None:
        return REBUILD if execution == REBUILD else FUSED
    if execution in FUSED_OP:
        raise ImpossibleExecution(obstacle)
    return REFERENCE


class ImpossibleExecution(ValueError):
    """An explicit execution the stage cannot run (``GraphStage`` adds its name and the fix)."""


def fused_obstacle(nodes) -> str | None:
    """Why the fused op cannot compute these node ops (None: it can), for the error and log."""
    for v, op in enumerate(nodes):
        reason = unfusable_reason(op)
        if reason is not None:
            return f"node {v} {reason}"
    return None


OTHER_EXECUTIONS = (
    "use execution='auto' (fused where possible, else node by node), 'reference' or 'recompute'"
)


def impossible(stage, reason: str, execution: str | None = None, fix: str = OTHER_EXECUTIONS):
    """The one-line ``ValueError`` for a fused-op ``execution`` (default: the stage's own) that
    ``stage`` cannot run."""
    execution = stage.execution if execution is None else execution
    label = stage_label(stage)
    return ValueError(f"{label}: execution={execution!r} cannot run it: {reason}; {fix}")


def stage_label(stage) -> str:
    if stage.name:
        return f"stage {stage.name!r}"
    return f"GraphStage({stage.spec.n} nodes, {stage.in_channels}->{stage.out_channels} channels)"


def stage_path(stage, x: torch.Tensor) -> str:
    """The path this forward of ``stage`` takes (``GraphStage.forward``'s one question)."""
    training, grad_mode = stage.training, torch.is_grad_enabled()
    tracing = torch.compiler.is_compiling() or exporting()
    grad = grad_mode and (x.requires_grad or any(p.requires_grad for p in stage.parameters()))
    step = training and grad and not tracing
    # The node ops are checked on every training step, not only at construction: BatchNorms
    # can be switched to eval mode or converted to SyncBatchNorm later.
    wants_fused = stage.execution in ("auto", *FUSED_OP)
    obstacle = fused_obstacle(stage.nodes) if step and wants_fused else None
    try:
        path = choose(
            stage.execution, training=training, grad=grad, tracing=tracing, obstacle=obstacle
        )
    except ImpossibleExecution as e:
        raise impossible(stage, str(e)) from None
    if training and grad_mode and not tracing:
        why = obstacle if path == REFERENCE and stage.execution == "auto" else None
        if not grad:
            why = "nothing in it needs a gradient"
        _note(stage, (path, why))
    return path


def set_execution(model: nn.Module, execution: str, stages=None, fix: str = OTHER_EXECUTIONS):
    """Set ``execution`` on the graph stages of ``model`` named in ``stages`` (a list of
    ``GraphStage.name``, e.g. ``["conv3"]``; None: every graph stage). All or nothing: a name
    that is not exactly one of the model's graph stages, or a fused-op execution a named stage
    cannot run, is a ``ValueError`` (ending in ``fix`` for the latter) and changes no stage."""
    from rwdet.nn.stage import GraphStage

    check_execution(execution)
    found = [m for m in model.modules() if isinstance(m, GraphStage)]
    if stages is None:
        chosen = found
    else:
        if isinstance(stages, str) or not all(isinstance(n, str) for n in stages):
            raise ValueError(f"stages={stages!r}: pass a list of stage names, e.g. ['conv3']")
        names = [m.name for m in found]
        unknown = [n for n in stages if n not in names]
        if unknown:
            raise ValueError(
                f"stages {unknown} are not graph stages of this model; its graph stages are {names}"
            )
        repeated = sorted({n for n in stages if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"stages {repeated} name more than one graph stage of this model; pass "
                "stages=None to set every stage"
            )
        chosen = [m for m in found if m.name in stages]
    if execution in FUSED_OP:
        for stage in chosen:
            obstacle = fused_obstacle(stage.nodes)
            if obstacle is not None:
                raise impossible(stage, obstacle, execution, fix)
    for stage in chosen:
        stage.execution = execution


def _note(stage, decision) -> None:
    global _changes
    if stage.__dict__.get("_decision") != decision:
        stage.__dict__["_decision"] = decision  # a plain attribute, not module state
        _changes += 1


def log_execution(model: nn.Module) -> None:
    """Log the training-step paths of ``model``'s stages once, and again when they change.

    Called by ``StagedClassifier`` after each forward; O(1) unless some stage's path changed."""
    if not model.training or torch.compiler.is_compiling() or exporting():
        return
    if model.__dict__.get("_execution_seen") == _changes:
        return
    model.__dict__["_execution_seen"] = _changes
    line = describe(model)
    if line is not None and line != model.__dict__.get("_execution_logged"):
        model.__dict__["_execution_logged"] = line
        log.info("%s", line)


def describe(model: nn.Module) -> str | None:
    """One line: which stages ran which path in their last training step (None: none yet)."""
    from rwdet.nn.stage import GraphStage

    stages = [(n, m) for n, m in model.named_modules() if isinstance(m, GraphStage)]
    settings = sorted({m.execution for _, m in stages})
    groups: list[tuple[tuple, list[str]]] = []
    last = None
    for name, stage in stages:
        decision = stage.__dict__.get("_decision")
        if decision is None:
            last = None
            continue
        if decision == last:
            groups[-1][1].append(name or stage.name)
        else:
            groups.append((decision, [name or stage.name]))
        last = decision
    if not groups:
        return None
    parts = []
    for (path, why), names in groups:
        span = names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
        what = "no backward" if path in (INFERENCE, UNRECORDED) else path
        parts.append(f"{what} for {span}" + (f" ({why})" if why else ""))
    return f"stage execution ({'/'.join(settings)}) in training: " + "; ".join(parts)
