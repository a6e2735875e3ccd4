"""The stage execution chooser (``rwdet.nn.execution``): what runs when, what is refused, and
the one log line per model. That every path gives the reference's numbers is
``tests/test_equivalence.py``'s business."""

import logging

import pytest
import torch
from test_equivalence import fused_node

from rwdet.graphs import GraphSpec
from rwdet.models import build_model
from rwdet.nn import GraphStage, get_wiring

EXECUTIONS = ("auto", "reference", "recompute", "fused", "rebuild")
WIRINGS = ("static", "popup", "dnw")
OPS = ("sepconv", "conv")


def _stage(execution, op, wiring, name="s3"):
    torch.manual_seed(0)
    spec = GraphSpec.generate("ws", 6, 1, k=2, p=0.5)
    w = get_wiring(wiring)
    return GraphStage(
        spec,
        2,
        3,
        1,
        op,
        w.make_gates(spec, 0.0),
        w.conv_layer,
        w.norm_layer,
        execution,
        name=name,
    )


def _expected(execution, op, wiring, training, grad):
    """The table, written out independently of the chooser."""
    if not (training and grad):
        return "node by node"
    fusable = op == "sepconv" and wiring != "popup"  # DNW gates keep plain layers
    if execution == "auto":
        return "fused" if fusable else "node by node"
    table = {"reference": "node by node", "recompute": "recompute", "fused": "fused"}
    return {**table, "rebuild": "rebuild"}[execution]


def _what_ran(stage, training, grad):
    """Observe the path: the fused op in the autograd graph, checkpointed nodes rerun in
    backward (``run_node`` is what the recompute path checkpoints), or neither."""
    stage.train(training)
    calls = []
    run_node = stage.run_node
    stage.run_node = lambda *a, **k: calls.append(a[0]) or run_node(*a, **k)
    x = torch.randn(2, 2, 5, 5)
    with torch.set_grad_enabled(grad):
        y = stage(x)
    op = fused_node(y) if y.grad_fn is not None else None
    kept = None if op is None else op.keep  # "rebuild" keeps no C_v between forward and backward
    if y.grad_fn is not None:
        y.square().sum().backward()
    if op is not None:
        return "fused" if kept else "rebuild"
    if calls:
        assert len(calls) == 2 * len(stage.nodes)  # forward, then again in backward
        return "recompute"
    return "node by node"


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_decision_table(execution, op, wiring, training, grad):
    fusable = op == "sepconv" and wiring != "popup"
    if execution in ("fused", "rebuild") and not fusable:  # the messages: the test below
        with pytest.raises(ValueError, match=f"execution='{execution}' cannot run it"):
            _stage(execution, op, wiring)
        return
    stage = _stage(execution, op, wiring)
    assert _what_ran(stage, training, grad) == _expected(execution, op, wiring, training, grad)


@pytest.mark.parametrize(
    "op,wiring,reason",
    [
        ("conv", "static", "node 0 is a ConvOp, not the sepconv op"),
        ("maxpool", "static", "node 0 is a PoolConvOp, not the sepconv op"),
        ("sepconv", "popup", "node 0 has PopupConv2d layers (popup/DNW layers), not nn.Conv2d"),
    ],
)
def test_impossible_fused_is_refused_at_construction(op, wiring, reason):
    with pytest.raises(ValueError) as e:
        _stage("fused", op, wiring, name="conv4")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("stage 'conv4': execution='fused' cannot run it: " + reason)
    assert "use execution='auto'" in msg and "'reference'" in msg


def test_impossible_fused_known_only_later_is_refused_at_the_first_training_step():
    """A BatchNorm put in eval mode while the stage trains (or converted to SyncBatchNorm
    after construction) cannot be known when the stage is built."""
    stage = _stage("fused", "sepconv", "static", name="")
    stage.train()
    stage.nodes[2][3].eval()
    with torch.no_grad():  # not a training step: nothing to refuse
        stage(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match=r"^GraphStage\(6 nodes, 2->3 channels\): .*node 2 has"):
        stage(torch.randn(2, 2, 5, 5))
    sync = _stage("fused", "sepconv", "static")
    sync.nodes[4][3] = torch.nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="node 4 ends in SyncBatchNorm"):
        sync(torch.randn(2, 2, 5, 5))
    # auto takes the reference path there instead, and says why in its log line.
    stage.execution = "auto"
    assert fused_node(stage(torch.randn(2, 2, 5, 5))) is None


def test_unknown_execution_and_old_keywords_are_refused():
    spec = GraphSpec.generate("ws", 6, 1, k=2, p=0.5)
    with pytest.raises(ValueError, match=r"execution='fast' is not known; use one of \['auto'"):
        GraphStage(spec, 2, 3, execution="fast")
    stage = GraphStage(spec, 2, 3)
    with pytest.raises(ValueError, match="execution='fast' is not known"):
        stage.execution = "fast"  # a later change is checked too
    for old, new in (
        ({"fused": False}, "reference"),
        ({"fused": False, "recompute": True}, "recompute"),
        ({"fused": True}, "auto"),
    ):
        with pytest.raises(TypeError, match=f"now execution=; pass execution='{new}'"):
            GraphStage(spec, 2, 3, **old)
        with pytest.raises(TypeError, match=f"now execution=; pass execution='{new}'"):
            build_model("randwire_small", channels=8, nodes=6, **old)


@pytest.fixture
def caplog(caplog):
    """caplog, also fed directly: a trainer's setup may have given the logger its own
    handlers (classification's log.txt), which must not hide the records from the test."""
    logger = logging.getLogger("rwdet.nn.execution")
    caplog.set_level(logging.INFO, logger=logger.name)
    logger.addHandler(caplog.handler)
    propagate, logger.propagate = logger.propagate, False  # each record once
    yield caplog
    logger.propagate = propagate
    logger.removeHandler(caplog.handler)


def _log_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "rwdet.nn.execution"]


def test_choice_is_logged_once_per_model_and_again_only_when_it_changes(caplog):
    kw = {"channels": 8, "nodes": 6, "stem": "small", "head_channels": 16, "num_classes": 3}
    model = build_model("randwire_small", **kw).train()
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        model(x)  # evaluation: no training step, nothing to say
    assert _log_lines(caplog) == []
    model.train()
    for _ in range(3):
        model(x).sum().backward()
    with torch.no_grad():
        model(x)  # a precise-BN pass in training mode: not a training step either
    model.forward_stages(x)
    assert _log_lines(caplog) == ["stage execution (auto) in training: fused for conv3-conv5"]
    caplog.clear()
    model.conv4.nodes[1][3].eval()  # a frozen BN statistic: conv4 falls back, once
    for _ in range(2):
        model(x).sum().backward()
    assert _log_lines(caplog) == [
        "stage execution (auto) in training: fused for conv3; reference for conv4 (node 1 "
        "has its BatchNorm2d in eval mode while the stage trains); fused for conv5"
    ]
    caplog.clear()
    other = build_model("randwire_small", node_op="conv", execution="recompute", **kw).train()
    for m in (other, model, other, model):  # one model's news does not repeat the other's
        m(x).sum().backward()
    assert _log_lines(caplog) == [
        "stage execution (recompute) in training: recompute for conv3-conv5"
    ]
    caplog.clear()
    popup = build_model("randwire_small", wiring="popup", **kw).train()
    popup(x).sum().backward()
    popup(x).sum().backward()
    (line,) = _log_lines(caplog)
    assert line.startswith("stage execution (auto) in training: reference for conv3-conv5 (")
    assert "PopupConv2d" in line


def test_steps_without_news_do_not_describe_the_model(monkeypatch):
    """The per-forward cost: one counter comparison unless some stage's path changed."""
    from rwdet.nn import execution

    kw = {"channels": 8, "nodes": 6, "stem": "small", "head_channels": 16, "num_classes": 3}
    model = build_model("randwire_small", **kw).train()
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    calls = []
    describe = execution.describe
    monkeypatch.setattr(execution, "describe", lambda m: calls.append(m) or describe(m))
    for _ in range(3):
        model(x).sum().backward()
    assert calls == []


def test_frozen_stages_are_logged_as_such(caplog):
    kw = {"channels": 8, "nodes": 6, "stem": "small", "head_channels": 16, "num_classes": 3}
    model = build_model("randwire_small", **kw).train()
    for name in ("conv1", "conv2", "conv3"):  # as detection's FREEZE_AT=3 does
        getattr(model, name).requires_grad_(False)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert _log_lines(caplog) == [
        "stage execution (auto) in training: no backward for conv3 (nothing in it needs a "
        "gradient); fused for conv4-conv5"
    ]


@pytest.mark.slow
def test_detection_config_sets_the_stages_execution_and_records_no_spec_for_it():
    from detectron2.modeling import build_backbone
    from test_d2_backbone import make_cfg

    def backbone(*opts):
        return build_backbone(make_cfg(opts=["MODEL.BACKBONE.FREEZE_AT", 0, *opts]))

    model = backbone("MODEL.RWDET.EXECUTION", "recompute").bottom_up.model
    assert {s.execution for s in _stages(model)} == {"recompute"}
    assert "execution" not in model.rwdet_spec["kwargs"]  # how it runs is not what it is
    with pytest.raises(ValueError, match="stage 'conv3': execution='fused' cannot run it: node 0 "
                       "ends in SyncBatchNorm"):  # fmt: skip
        backbone("MODEL.RWDET.EXECUTION", "fused", "MODEL.RWDET.NORM", "SyncBN")


def _stages(model):
    return [m for m in model.modules() if isinstance(m, GraphStage)]


def test_execution_is_not_recorded_as_architecture():
    from rwdet.models import build_model

    a = build_model("randwire_small", num_classes=3, execution="reference")
    b = build_model("randwire_small", num_classes=3)
    assert "execution" not in a.rwdet_spec["kwargs"]
    assert a.rwdet_spec == b.rwdet_spec


def test_set_execution_names_stages_and_refuses_what_they_cannot_run():
    from rwdet.nn import set_execution

    kw = {"channels": 8, "nodes": 6, "num_classes": 3, "head_channels": 16}
    model = build_model("randwire_small", **kw)
    set_execution(model, "rebuild", ["conv4"])
    assert {s.name: s.execution for s in _stages(model)} == {
        "conv3": "auto",
        "conv4": "rebuild",
        "conv5": "auto",
    }
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # every stage ran and got gradients
    assert all(p.grad is not None for p in model.conv4.parameters())
    with pytest.raises(ValueError, match=r"stages \['conv6'\] are not graph stages of this "
                       r"model; its graph stages are \['conv3', 'conv4', 'conv5'\]"):  # fmt: skip
        set_execution(model, "rebuild", ["conv6"])
    set_execution(model, "reference")
    assert {s.execution for s in _stages(model)} == {"reference"}
    popup = build_model("randwire_small", wiring="popup", **kw)
    with pytest.raises(ValueError, match="stage 'conv3': execution='rebuild' cannot run it: "
                       "node 0 has PopupConv2d"):  # fmt: skip
        set_execution(popup, "rebuild", ["conv3"])
    # All or nothing: a stage that cannot run it leaves every stage as it was.
    mixed = build_model("randwire_small", **kw)
    mixed.conv5.nodes[0][3] = torch.nn.SyncBatchNorm(mixed.conv5.nodes[0][3].num_features)
    with pytest.raises(ValueError, match="stage 'conv5'"):
        set_execution(mixed, "rebuild", ["conv4", "conv5"])
    assert {s.execution for s in _stages(mixed)} == {"auto"}
    with pytest.raises(ValueError, match=r"stages='conv3': pass a list of stage names"):
        set_execution(model, "rebuild", "conv3")


def test_set_execution_reaches_stages_without_names_and_refuses_ambiguous_ones():
    spec = GraphSpec.generate("ws", 6, 1, k=2, p=0.5)
    model = torch.nn.Sequential(GraphStage(spec, 2, 3), GraphStage(spec, 3, 3))  # both named ""
    from rwdet.nn import set_execution

    set_execution(model, "rebuild")
    assert [s.execution for s in model] == ["rebuild", "rebuild"]
    with pytest.raises(ValueError, match=r"stages \[''\] name more than one graph stage"):
        set_execution(model, "reference", [""])


def test_detection_config_names_the_stages_to_rebuild():
    from detectron2.modeling import build_backbone
    from test_d2_backbone import make_cfg

    def backbone(*opts):
        return build_backbone(make_cfg(opts=["MODEL.BACKBONE.FREEZE_AT", 0, *opts]))

    model = backbone("MODEL.RWDET.REBUILD_STAGES", ["conv3", "conv4"]).bottom_up.model
    executions = {s.name: s.execution for s in _stages(model)}
    assert executions["conv3"] == executions["conv4"] == "rebuild"
    assert {executions[n] for n in executions if n not in ("conv3", "conv4")} == {"auto"}
    assert "execution" not in model.rwdet_spec["kwargs"]
    with pytest.raises(ValueError, match=r"^MODEL.RWDET.REBUILD_STAGES: stages \['res3'\] are "
                       "not graph stages"):  # fmt: skip
        backbone("MODEL.RWDET.REBUILD_STAGES", ["res3"])
    with pytest.raises(ValueError, match="execution='rebuild' cannot run it: node 0 ends in "
                       "SyncBatchNorm.*; remove it from MODEL.RWDET.REBUILD_STAGES"):  # fmt: skip
        backbone("MODEL.RWDET.REBUILD_STAGES", ["conv3"], "MODEL.RWDET.NORM", "SyncBN")
