"""Optimised execution paths give the reference path's outputs, gradients and BN statistics.

Reference: ``GraphStage(execution="reference")`` (plain autograd, node by node).
Optimised: per-node checkpointing (``execution="recompute"``) and the fused stage op
(``execution="fused"``).
"""

import copy

import pytest
import torch
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.models import build_model
from rwdet.nn import GraphStage

GRAPHS = [("er", {"p": 0.3}), ("ba", {"m": 3}), ("ws", {"k": 4, "p": 0.75})]
PATHS = {
    "recompute": {"execution": "recompute"},
    "fused": {"execution": "fused"},
    "rebuild": {"execution": "rebuild"},
}


def _stage_pair(gen, params, path):
    torch.manual_seed(0)
    spec = GraphSpec.generate(gen, 10, 3, **params)
    ref = GraphStage(spec, 3, 6, stride=2, execution="reference")
    with torch.no_grad():
        ref.gates.weight.normal_()
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):  # away from the (1, 0) init
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    ref.nodes[1][3].momentum = None  # cumulative running average
    opt = copy.deepcopy(ref)
    for k, v in PATHS[path].items():
        setattr(opt, k, v)
    return ref, opt


def fused_node(y):
    """The ``SepConvStage`` node in ``y``'s autograd graph, or None (on CPU an NCHW input is
    switched to channels_last and back, so the op is not necessarily ``y.grad_fn``)."""
    todo, seen = [y.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "SepConvStage" in type(fn).__name__:
            return fn
        todo += [f for f, _ in fn.next_functions]
    return None


def _close(a, b, rtol=1e-4, msg=None):
    """Elementwise ``rtol`` plus an absolute slack of ``rtol`` times the tensor's largest value:
    fp32 sums of hundreds of products differ in their last bits from one order to another."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * a.abs().max().item() + 1e-7, msg=msg)


def _assert_same_training_step(ref, opt, x, rtol=1e-4):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), opt(xb)
    _close(ya, yb, 1e-5)  # the paths may run different (NCHW / NHWC) conv kernels
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    _close(xa.grad, xb.grad, rtol)
    for (name, pa), (_, pb) in zip(ref.named_parameters(), opt.named_parameters()):
        _close(pa.grad, pb.grad, rtol, msg=name)
    # Running statistics updated exactly once, as in the reference.
    for (name, ba), (_, bb) in zip(ref.named_buffers(), opt.named_buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-7, msg=name)
    return yb


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("gen,params", GRAPHS)
def test_stage_matches_reference(gen, params, path):
    ref, opt = _stage_pair(gen, params, path)
    for _ in range(2):  # the second step starts from updated running statistics
        y = _assert_same_training_step(ref, opt, torch.randn(4, 3, 12, 12))
    assert (fused_node(y) is not None) == (path in ("fused", "rebuild"))


@pytest.mark.parametrize("gen,params", GRAPHS)
def test_fused_stage_matches_reference_channels_last(gen, params):
    ref, opt = _stage_pair(gen, params, "fused")
    ref.to(memory_format=torch.channels_last)
    opt.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 12, 12).to(memory_format=torch.channels_last)
    y = _assert_same_training_step(ref, opt, x)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["fused", "inference", "node-by-node training"])
def test_cpu_stage_layout(mode):
    """The fused op and inference compute in channels_last and give the caller's layout back;
    node-by-node training keeps the caller's layout. Weight gradients always have the
    weights' exact strides (DDP's buckets compare them)."""
    ref, opt = _stage_pair("ws", {"k": 4, "p": 0.75}, "fused")
    stage = opt if mode == "fused" else ref
    stage.train(mode != "inference")
    x = torch.randn(4, 3, 12, 12)
    inner = []
    hook = stage.nodes[0].register_forward_hook(lambda m, i, o: inner.append(i[0]))
    with torch.set_grad_enabled(mode != "inference"):
        y = stage(x)
        y_cl = stage(x.to(memory_format=torch.channels_last))
    hook.remove()
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    if mode == "fused":  # the op runs its nodes inside, without module hooks
        assert fused_node(y) is not None
    else:
        in_cl = inner[0].is_contiguous(memory_format=torch.channels_last)
        assert in_cl == (mode == "inference")
    if mode != "node-by-node training":  # same kernels, one layout copy: bit-identical
        torch.testing.assert_close(y, y_cl, rtol=0, atol=0)
    if mode != "inference":
        y.square().sum().backward()
        for name, p in stage.named_parameters():
            assert p.grad.stride() == p.stride(), name


def test_fused_op_in_nchw_matches_reference():
    """The op itself is layout-agnostic: on CUDA it runs on NCHW inputs as given."""
    from rwdet.nn.fused import fused_stage

    class Direct(nn.Module):  # the op on an NCHW input, without the stage's CPU switch
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, x):
            return fused_stage(self.stage, x, self.stage.gates())

    ref, opt = _stage_pair("ba", {"m": 3}, "fused")
    y = _assert_same_training_step(ref, Direct(opt), torch.randn(4, 3, 12, 12))
    assert y.is_contiguous() and "SepConvStage" in type(y.grad_fn).__name__


def test_fused_stage_gradcheck():
    torch.manual_seed(0)
    spec = GraphSpec.generate("ws", 5, 1, k=2, p=0.5)
    stage = GraphStage(spec, 2, 3, stride=1).double()
    with torch.no_grad():
        stage.gates.weight.normal_()
    x = torch.randn(3, 2, 4, 4, dtype=torch.double, requires_grad=True)
    assert fused_node(stage(x)) is not None
    # nondet_tol: a repeated backward rebuilds the freed activations (same math, other rounding).
    assert torch.autograd.gradcheck(stage, (x,), nondet_tol=1e-10)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_model_matches_reference_with_edge_drop(path):
    kw = {"channels": 8, "nodes": 10, "stem": "small", "head_channels": 16, "edge_drop": 0.5}
    torch.manual_seed(0)
    ref = build_model("randwire_c109", execution="reference", **kw)
    opt = build_model("randwire_c109", **{**kw, **PATHS[path]})
    opt.load_state_dict(ref.state_dict())
    _assert_same_model_step(ref, opt)


def _assert_same_model_step(ref, opt, rtol=1e-4):
    ref.train(), opt.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    la = ref(x).square().mean()
    torch.manual_seed(5)
    lb = opt(x).square().mean()
    torch.testing.assert_close(la, lb)
    la.backward(), lb.backward()
    for (name, pa), (_, pb) in zip(ref.named_parameters(), opt.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        _close(pa.grad, pb.grad, rtol, msg=name)


def test_fused_dnw_model_matches_reference():
    """DNW-on-RandWire uses plain layers, so it runs fused; hallucinated edges get gradients."""
    kw = {"channels": 8, "nodes": 8, "stem": "small", "head_channels": 16, "wiring": "dnw"}
    torch.manual_seed(0)
    ref = build_model("randwire_small", execution="reference", **kw)
    opt = build_model("randwire_small", **kw)
    opt.load_state_dict(ref.state_dict())
    _assert_same_model_step(ref, opt)
    assert fused_node(opt.conv3(torch.randn(2, 8, 8, 8))) is not None


def test_fused_bf16_autocast_as_accurate_as_reference():
    """Under bf16 autocast both paths round differently; each must be as close to fp64."""
    ref, opt = _stage_pair("ws", {"k": 4, "p": 0.75}, "fused")
    exact = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 12, 12)
    xa, xb, xc = (x.clone().double() if i == 2 else x.clone() for i in range(3))
    for t in (xa, xb, xc):
        t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref(xa), opt(xb)
    assert ya.dtype == yb.dtype == torch.bfloat16
    yc = exact(xc)
    g = torch.randn_like(yc)
    ya.backward(g.to(ya.dtype)), yb.backward(g.to(yb.dtype)), yc.backward(g)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert err(yb, yc) <= 1.05 * err(ya, yc) + 1e-3
    assert err(xb.grad, xc.grad) <= 1.1 * err(xa.grad, xc.grad) + 1e-3
    for (name, pa), (_, pb), (_, pc) in zip(
        ref.named_parameters(), opt.named_parameters(), exact.named_parameters()
    ):
        assert pb.grad.dtype == pb.dtype, name
        assert err(pb.grad, pc.grad) <= 1.25 * err(pa.grad, pc.grad) + 1e-2, name


def test_fused_path_keeps_one_tensor_per_node():
    """Saved for backward: the reference keeps ~4 activations per node, the fused op 1."""
    ref, opt = _stage_pair("ws", {"k": 4, "p": 0.75}, "fused")
    # channels_last: on CPU an NCHW input would be copied to it, and the copy saved too.
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last).requires_grad_()
    node_bytes = 4 * 6 * 8 * 8 * 4  # batch x channels x 8 x 8 x fp32

    def saved_bytes(stage):
        seen = {}

        def pack(t):
            if t.dim() == 4 and t.shape[0] == 4:  # activations, not weights/statistics/gates
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = stage(x)
        for c in getattr(fused_node(y), "keep", None) or []:
            seen[c.untyped_storage().data_ptr()] = c.untyped_storage().nbytes()
        seen.pop(x.untyped_storage().data_ptr(), None)
        weights = {p.untyped_storage().data_ptr() for p in stage.parameters()}
        return sum(b for ptr, b in seen.items() if ptr not in weights)

    n = ref.spec.n
    assert saved_bytes(opt) == n * node_bytes
    assert saved_bytes(ref) >= 3 * n * node_bytes
    opt.execution = "rebuild"  # nothing of the stage between forward and backward
    assert saved_bytes(opt) == 0


def test_fused_backward_twice_matches_reference():
    """retain_graph=True: the second backward rebuilds the freed activations from the input."""
    ref, opt = _stage_pair("er", {"p": 0.3}, "fused")
    x = torch.randn(2, 3, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa).square().sum(), opt(xb).square().sum()
    for retain in (True, False):
        ya.backward(retain_graph=retain)
        yb.backward(retain_graph=retain)
    _close(xa.grad, xb.grad)
    for (name, pa), (_, pb) in zip(ref.named_parameters(), opt.named_parameters()):
        _close(pa.grad, pb.grad, msg=name)


def test_unfusable_stages_run_node_by_node():
    spec = GraphSpec.generate("ws", 6, 1, k=2, p=0.5)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    conv_op = GraphStage(spec, 3, 4, node_op="conv")
    assert conv_op(x).grad_fn is not None and fused_node(conv_op(x)) is None
    stage = GraphStage(spec, 3, 4)
    stage.nodes[2][3].eval()  # a frozen BN anywhere: reference path
    assert stage(x).grad_fn is not None and fused_node(stage(x)) is None
    stage.train()
    assert fused_node(stage(x)) is not None
    with torch.no_grad():
        assert stage(x).grad_fn is None
    popup = build_model("randwire_small", channels=8, nodes=6, stem="small", wiring="popup")
    popup.train()
    y = popup.conv3(torch.randn(2, 8, 8, 8))
    assert y.grad_fn is not None and fused_node(y) is None


def test_weighted_sum_matches_naive_and_gradcheck():
    from rwdet.nn.aggregate import weighted_sum

    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)
    zs = [torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True) for _ in range(3)]
    naive = sum(wi * z for wi, z in zip(w, zs))
    torch.testing.assert_close(weighted_sum(w, zs), naive)
    assert torch.autograd.gradcheck(lambda w, *z: weighted_sum(w, list(z)), (w, *zs))
    # channels_last inputs take the dot-product path without copies and agree too.
    zc = [z.detach().to(memory_format=torch.channels_last).requires_grad_() for z in zs]
    assert torch.autograd.gradcheck(lambda w, *z: weighted_sum(w, list(z)), (w, *zc))


# ---------------------------------------------------------------- FrozenBN (the detectors' norm)


def _frozen_pair(gen="ws", params=None, requires_grad=True):
    """(reference, fused) stages whose nodes end in detectron2's FrozenBatchNorm2d with
    statistics and affine away from the identity."""
    from detectron2.layers import FrozenBatchNorm2d

    torch.manual_seed(0)
    spec = GraphSpec.generate(gen, 10, 3, **(params or {"k": 4, "p": 0.75}))
    ref = GraphStage(spec, 3, 6, stride=2, execution="reference", norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        ref.gates.weight.normal_()
        for m in ref.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    ref.requires_grad_(requires_grad)
    opt = copy.deepcopy(ref)
    opt.execution = "fused"
    return ref, opt


@pytest.mark.parametrize("execution", ["fused", "rebuild"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("gen,params", GRAPHS)
def test_frozen_bn_stage_runs_fused_and_matches_reference(gen, params, layout, execution):
    ref, opt = _frozen_pair(gen, params)
    opt.execution = execution
    x = torch.randn(4, 3, 12, 12)
    if layout == "channels_last":
        ref.to(memory_format=torch.channels_last), opt.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    for _ in range(2):
        y = _assert_same_training_step(ref, opt, x)
    assert fused_node(y) is not None


def test_frozen_bn_fused_keeps_one_tensor_per_node_and_backward_twice():
    ref, opt = _frozen_pair()
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last).requires_grad_()
    y = opt(x)
    keep = fused_node(y).keep
    assert len(keep) == opt.spec.n and all(c.shape == (4, 6, 8, 8) for c in keep)
    xa = x.detach().clone().requires_grad_()
    ya, yb = ref(xa).square().sum(), y.square().sum()
    for retain in (True, False):  # the second backward rebuilds C from the stage input
        ya.backward(retain_graph=retain)
        yb.backward(retain_graph=retain)
    _close(xa.grad, x.grad)
    for (name, pa), (_, pb) in zip(ref.named_parameters(), opt.named_parameters()):
        _close(pa.grad, pb.grad, msg=name)


def test_frozen_stage_without_gradients_runs_node_by_node():
    """FREEZE_AT's frozen stages: nothing needs a gradient, nothing is saved, no fused op."""
    ref, opt = _frozen_pair(requires_grad=False)
    x = torch.randn(2, 3, 8, 8)
    y = opt(x)
    assert y.grad_fn is None and fused_node(y) is None
    torch.testing.assert_close(y, ref(x))


def test_frozen_bn_model_matches_reference():
    """A RandWire built as the detection backbone builds it (``norm_layer`` FrozenBN)."""
    from detectron2.layers import get_norm

    kw = {"channels": 8, "nodes": 10, "stem": "small", "head_channels": 16}
    kw["norm_layer"] = lambda c: get_norm("FrozenBN", c)
    torch.manual_seed(0)
    ref = build_model("randwire_c109", execution="reference", **kw)
    opt = build_model("randwire_c109", **kw)
    opt.load_state_dict(ref.state_dict())
    _assert_same_model_step(ref, opt)
    opt.train()
    assert fused_node(opt.conv3(torch.randn(2, 8, 8, 8))) is not None


def test_frozen_bn_fused_under_bf16_autocast_as_accurate_as_reference():
    ref, opt = _frozen_pair()
    exact = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 12, 12)
    xa, xb, xc = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref(xa), opt(xb)
    assert ya.dtype == yb.dtype == torch.bfloat16 and fused_node(yb) is not None
    xc.requires_grad_()
    yc = exact(xc)
    g = torch.randn_like(yc)
    ya.backward(g.to(ya.dtype)), yb.backward(g.to(yb.dtype)), yc.backward(g)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert err(yb, yc) <= 1.05 * err(ya, yc) + 1e-3
    assert err(xb.grad, xc.grad) <= 1.1 * err(xa.grad, xc.grad) + 1e-3
    for (name, pa), (_, pb), (_, pc) in zip(
        ref.named_parameters(), opt.named_parameters(), exact.named_parameters()
    ):
        assert err(pb.grad, pc.grad) <= 1.25 * err(pa.grad, pc.grad) + 1e-2, name


# ------------------------------------------- forwards autograd does not record (inference)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _eval_stage(gen, params, frozen_params=False):
    ref, _ = _stage_pair(gen, params, "fused")
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):  # eval-mode BN away from the identity
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    return ref.eval().requires_grad_(not frozen_params)


def _borrowing_nodes(stage):
    """Nodes whose ReLU input is a tensor someone else still reads: the stage input (one ReLU
    shared by all sources) or a unit edge's parent that has a later child."""
    lent = {v for v in range(stage.spec.n) if len(stage.in_edges[v]) == 1}
    lent = {v for v in lent if stage.last_use.get(stage.in_edges[v][0][1]) != v}
    return (1 if stage.sources else 0) + len(lent)


@pytest.mark.parametrize("how", ["no_grad", "frozen parameters"])
@pytest.mark.parametrize("gen,params", GRAPHS)
def test_unrecorded_forward_matches_reference_in_place_where_safe(gen, params, how):
    """Without autograd the stage ReLUs in place wherever nothing else reads the memory and
    shares the stage input's ReLU among the sources: the same numbers as the reference (same
    kernels, same layout), the caller's input untouched, and out-of-place ReLUs only where a
    tensor is still read by others."""
    stage = _eval_stage(gen, params, frozen_params=how == "frozen parameters")
    x = torch.randn(4, 3, 12, 12).to(memory_format=torch.channels_last)
    x_before = x.clone()
    with torch.enable_grad():  # eval with gradients: node by node, every op out of place
        expected = stage(x.clone().requires_grad_()).detach()
    counter = _OpCounter()
    with counter, torch.set_grad_enabled(how != "no_grad"):
        y = stage(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    borrowing = _borrowing_nodes(stage)  # one of them for all the sources together
    assert counter.calls.count("relu.default") == borrowing
    in_place = stage.spec.n - len(stage.sources) - (borrowing - 1)
    assert counter.calls.count("relu_.default") == in_place


def test_fused_forward_relus_in_place_where_safe():
    _, opt = _stage_pair("ws", {"k": 4, "p": 0.75}, "fused")
    x = torch.randn(4, 3, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    counter = _OpCounter()
    with counter:
        y = opt(x)
    assert fused_node(y) is not None
    assert counter.calls.count("relu.default") == _borrowing_nodes(opt)


def test_unrecorded_forward_runs_hooked_node_ops_whole():
    """A node op with a hook runs through its own ``forward`` (the hook sees the aggregation),
    and a hook anywhere in the nodes keeps every node output as the hook saw it."""
    stage = _eval_stage("ws", {"k": 4, "p": 0.75})
    x = torch.randn(2, 3, 8, 8)
    seen = []
    stage.nodes[3].register_forward_hook(lambda m, i, o: seen.append(i[0].min().item()))
    with torch.no_grad():
        y = stage(x)
    assert len(seen) == 1 and seen[0] < 0  # the node's input before its own ReLU
    with torch.enable_grad():
        torch.testing.assert_close(y, stage(x).detach())
    kept = {}
    for v, node in enumerate(stage.nodes):  # on the last layer: its output is the node's
        node[3].register_forward_hook(lambda m, i, o, v=v: kept.update({v: (o, o.clone())}))
    with torch.no_grad():
        stage(x)
    assert len(kept) == stage.spec.n
    assert all(torch.equal(o, copy) for o, copy in kept.values())
